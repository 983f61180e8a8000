"""Continuous batching: requests join and leave the running batch between steps. Plain Python, no tensors.

Each step is either a prefill (waiting sequences that fit the token budget and the free blocks start together) or
a decode (every running sequence advances one token). When the cache has no block for a running sequence's next
token, the most recently started sequence is preempted: its blocks are freed and it waits to be prefilled again,
prompt and generated tokens together, so its output is unchanged.
"""
from __future__ import annotations

from collections import deque

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if len(seq) > self.max_model_len:
            raise ValueError(f"prompt of {len(seq)} tokens exceeds max_model_len={self.max_model_len}")
        max_blocks = self.block_manager.num_blocks
        if seq.num_blocks(self.block_manager.block_size) > max_blocks:
            raise ValueError(f"prompt of {len(seq)} tokens does not fit the KV cache "
                             f"({max_blocks} blocks of {self.block_manager.block_size})")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences to run this step and whether it is a prefill step."""
        scheduled: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - seq.num_cached_tokens
            if scheduled and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            num_tokens += new_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        if scheduled:
            return scheduled, True

        running = list(self.running)
        self.running.clear()
        for seq in running:
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted below by a sequence ahead of it
            while not self.block_manager.can_append(seq):
                victims = [s for s in running if s.status == SequenceStatus.RUNNING and s is not seq
                           and s not in scheduled]
                self._preempt(victims[-1] if victims else seq)
                if seq.status != SequenceStatus.RUNNING:
                    break
            if seq.status == SequenceStatus.RUNNING:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        if not scheduled and self.waiting:
            seq = self.waiting[0]
            raise RuntimeError(f"sequence {seq.request_id} needs {seq.num_blocks(self.block_manager.block_size)} "
                               f"KV blocks but the cache has {self.block_manager.num_blocks}")
        return scheduled, False

    def _preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length, abort) and free its blocks."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], eos_token_ids: set[int]) -> list[Sequence]:
        """Append each sequence's sampled token; finish those that hit EOS, a stop token or a length limit.

        Returns the sequences that finished."""
        finished = []
        for seq, tok in zip(seqs, token_ids):
            seq.num_cached_tokens = len(seq)
            seq.append_token(tok)
            p = seq.params
            reason = None
            if seq.num_output_tokens >= p.min_tokens and (
                    (not p.ignore_eos and tok in eos_token_ids) or tok in p.stop_token_ids):
                reason = "stop"
            elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
                reason = "length"
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
        return finished
