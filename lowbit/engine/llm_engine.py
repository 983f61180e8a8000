"""The engine: a scheduler, a model runner, a sampler and a tokenizer, advanced one step at a time.

`add_request` and `abort_request` may be called from any thread (the server's event loop); they are queued and
applied at the start of the next `step`, which only the engine's own thread calls.

Under tensor/expert parallel every rank holds an engine, in one of two ways. Offline (`LLM`, `lowbit generate`)
every rank is given the same requests and schedules them alike; rank 0's sampled tokens are broadcast so the
schedulers never diverge. Serving, rank 0 alone takes requests, schedules and samples: it `lead`s, broadcasting
each batch it runs (sequence ids, new tokens, lengths, block tables), and the other ranks `follow`, running the
same forward on their shards and KV caches until rank 0 releases them.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import torch

from lowbit.config import EngineConfig, resolve_model_path
from lowbit.engine import parallel
from lowbit.engine.block_manager import BlockManager
from lowbit.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from lowbit.engine.sampler import Sampler
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import Sequence
from lowbit.models.loader import Checkpoint
from lowbit.sampling_params import SamplingParams
from lowbit.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer


@dataclass
class StepOutput:
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list = field(default_factory=list)  # per new token: (logprob, [(token_id, logprob), ...]) or None


class _BatchSeq:
    """A sequence of a broadcast batch as a following rank knows it: what ModelRunner reads to build its inputs."""
    __slots__ = ("block_table", "length", "num_cached_tokens", "seq_id", "token_ids")

    def __init__(self, seq_id: int, num_cached_tokens: int, new_token_ids: list[int], block_table: list[int],
                 length: int, is_prefill: bool):
        self.seq_id = seq_id
        self.num_cached_tokens = num_cached_tokens
        # a prefill reads token_ids[num_cached_tokens:], a decode only the last token
        self.token_ids = [0] * num_cached_tokens + new_token_ids if is_prefill else new_token_ids
        self.block_table = block_table
        self.length = length

    def __len__(self) -> int:
        return self.length

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]


_END, _BATCH = 0, 1  # the first int of a message from the leader


def encode_batch(seqs: list[Sequence], is_prefill: bool, all_logits: bool) -> list[int]:
    """One step's batch as ints: [_BATCH, is_prefill, all_logits, n, then per sequence seq_id, num_cached_tokens,
    length, new token count, block count, the new tokens, the block table]."""
    out = [_BATCH, int(is_prefill), int(all_logits), len(seqs)]
    for s in seqs:
        new = s.token_ids[s.num_cached_tokens:] if is_prefill else [s.last_token]
        out += [s.seq_id, s.num_cached_tokens, len(s), len(new), len(s.block_table), *new, *s.block_table]
    return out


def decode_batch(msg: list[int]) -> tuple[list[_BatchSeq], bool, bool] | None:
    """The batch of `encode_batch`, or None for the leader's end message."""
    if msg[0] == _END:
        return None
    is_prefill, all_logits, n = bool(msg[1]), bool(msg[2]), msg[3]
    seqs, i = [], 4
    for _ in range(n):
        seq_id, cached, length, n_new, n_blocks = msg[i:i + 5]
        i += 5
        new, blocks = msg[i:i + n_new], msg[i + n_new:i + n_new + n_blocks]
        i += n_new + n_blocks
        seqs.append(_BatchSeq(seq_id, cached, new, blocks, length, is_prefill))
    return seqs, is_prefill, all_logits


class _Request:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None):
        self.seq = seq
        self.detok = detok
        self.text = ""  # emitted so far


class LLMEngine:
    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto", device=None,
                 engine_config: EngineConfig | None = None):
        path = resolve_model_path(model)
        self.model_path = path
        ckpt = Checkpoint(path)
        self.model_config = ckpt.model_config()
        self.engine_config = engine_config or EngineConfig()
        self.device = resolve_device(device)
        parallel.init_parallel(self.engine_config.tensor_parallel_size, self.engine_config.expert_parallel,
                               backend="nccl" if self.device.type == "cuda" else "gloo")
        self.dtype = resolve_dtype(dtype, self.model_config, self.device)
        self.tokenizer = load_tokenizer(path)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config.eos_token_id, path)
        self.runner = ModelRunner(ckpt, self.model_config, self.engine_config, self.dtype, self.device)
        # one sequence of max_model_len must fit the whole cache, or preemption could never make room for it
        max_len = min(self.engine_config.max_model_len, self.model_config.max_position_embeddings,
                      self.runner.num_blocks * self.engine_config.block_size)
        self.max_model_len = max_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.engine_config.block_size)
        self.scheduler = Scheduler(self.block_manager, self.engine_config.max_num_seqs,
                                   self.engine_config.max_num_batched_tokens, max_len)
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._leading = False  # rank 0 of a served parallel world: every batch is broadcast before it runs
        self._released = False  # the followers were told no batch will come
        self._run_lock = threading.Lock()  # a batch's broadcast and forward, or the release, one at a time

    # ------------------------------------------------------------------ leading and following
    def lead(self) -> None:
        """On rank 0 of a parallel world: from now on broadcast every batch to the other ranks (which `follow`);
        only this rank schedules and samples. A no-op in one process."""
        if not parallel.is_parallel():
            return
        if not parallel.is_first_rank():
            raise RuntimeError("only rank 0 leads; the other ranks follow")
        self._leading = True

    def follow(self) -> None:
        """On a rank other than 0: run each batch the leader broadcasts on this rank's shards and KV cache, until
        the leader releases the followers."""
        while (batch := decode_batch(parallel.broadcast_message(None))) is not None:
            self.runner.run(*batch)

    def release_followers(self) -> None:
        """Tell the followers that no batch will come (they return from `follow`). Waits for a batch in progress;
        once released, running another batch is an error. Safe to call more than once, from any thread."""
        with self._run_lock:
            if self._leading and not self._released:
                self._released = True
                parallel.broadcast_message([_END])

    def _run(self, seqs: list[Sequence], is_prefill: bool, all_logits: bool = False) -> torch.Tensor:
        if not self._leading:
            return self.runner.run(seqs, is_prefill, all_logits, ahead=self._reserve_step_ahead(seqs, is_prefill))
        with self._run_lock:
            if self._released:
                raise RuntimeError("the other ranks have been released: no batch can run")
            parallel.broadcast_message(encode_batch(seqs, is_prefill, all_logits))
            return self.runner.run(seqs, is_prefill, all_logits)

    def _reserve_step_ahead(self, seqs: list[Sequence], is_prefill: bool) -> bool:
        """Whether this decode step may launch the next one before its tokens are read (EngineConfig.async_decode),
        reserving the cache slots the step ahead writes where it may:
        where the next step is this batch again, each sequence one token on, as far as the host can tell before
        sampling. That is: one process, a CUDA graph for the batch, greedy requests without logprobs (the token
        is the graph's argmax), none waiting to start, none at its length limit, and cache blocks reserved for
        the step ahead. A request that stops on EOS or a stop string instead wastes the step ahead."""
        runner = self.runner
        if (is_prefill or not self.engine_config.async_decode or parallel.is_parallel() or runner.graphs is None
                or not runner.graphs.fits(len(seqs)) or self._pending or self.scheduler.waiting):
            return False
        for s in seqs:
            p = s.params
            if (not p.greedy or p.logprobs is not None or s.num_output_tokens + 1 >= p.max_tokens
                    or len(s) + 1 >= self.max_model_len):
                return False
        return self.block_manager.reserve_next(seqs)

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_path} has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request (thread-safe); its tokens come out of later `step` calls."""
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len and len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_model_len={self.max_model_len}")
        seq = Sequence(ids, params, request_id)
        req = _Request(seq, IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None)
        with self._lock:
            if seq.request_id in self._requests:
                raise ValueError(f"request id {seq.request_id!r} is already running")
            self._requests[seq.request_id] = req
            self._pending.append(("add", req))
        return seq.request_id

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))

    def _apply_pending(self) -> list[StepOutput]:
        outs = []
        with self._lock:
            pending, self._pending = self._pending, collections.deque()
        for kind, arg in pending:
            if kind == "add":
                self.scheduler.add(arg.seq)
            else:
                req = self._requests.pop(arg, None)
                if req is not None:
                    self.scheduler.finish(req.seq, "abort")
                    self.sampler.forget(req.seq.seq_id)
                    outs.append(self._output(req, [], "", []))
        return outs

    def has_unfinished(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + sum(1 for k, _ in self._pending if k == "add")

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[StepOutput]:
        """Run one scheduled batch; return what each affected request produced."""
        outputs = self._apply_pending()
        if not self.scheduler.has_unfinished():
            return outputs
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return outputs
        logits = self._run(seqs, is_prefill)  # [B, V]
        samples = self.sampler(logits, [s.params for s in seqs], [s.seq_id for s in seqs], self.runner.greedy_ids)
        if not self._leading:  # every rank schedules: all take rank 0's tokens
            for sample, tok in zip(samples, parallel.broadcast_from_first([r.token_id for r in samples])):
                sample.token_id = tok
        self.scheduler.postprocess(seqs, [r.token_id for r in samples], self.eos_token_ids)
        for seq, sample in zip(seqs, samples):
            req = self._requests[seq.request_id]
            new_text = self._detokenize(req)
            lp = [] if sample.logprob is None else [(sample.logprob, sample.top_logprobs or [])]
            outputs.append(self._output(req, [sample.token_id], new_text, lp))
        return outputs

    def _detokenize(self, req: _Request) -> str:
        """The request's new text. A stop string finishes the request and is cut off; text that may be the start of
        a stop string is held back until the next token decides it."""
        seq = req.seq
        if req.detok is None:
            return ""
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and ids and (ids[-1] in self.eos_token_ids
                                                    or ids[-1] in seq.params.stop_token_ids):
            ids = ids[:-1]  # the stop token itself is not text
        req.detok.update(ids)
        full, emitted = req.detok.text, len(req.text)
        end = len(full)
        stops = seq.params.stop
        if stops:
            start = max(0, emitted - max(map(len, stops)) + 1)
            hits = [i for i in (full.find(s, start) for s in stops) if i >= 0]
            if hits:
                end = min(hits)
                self.scheduler.finish(seq, "stop")
            elif not seq.is_finished:
                end -= max((k for s in stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        delta = full[emitted:max(end, emitted)]
        req.text += delta
        return delta

    def _output(self, req: _Request, new_ids: list[int], new_text: str, logprobs: list) -> StepOutput:
        seq = req.seq
        if seq.is_finished:
            self._requests.pop(seq.request_id, None)
            self.sampler.forget(seq.seq_id)
        return StepOutput(seq.request_id, new_ids, new_text, seq.is_finished, seq.finish_reason,
                          seq.num_prompt_tokens, seq.num_output_tokens, logprobs)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position of `token_ids`, [len, vocab] float32 (on the CPU)."""
        ids = self.encode(token_ids)
        if len(ids) > self.max_model_len:
            raise ValueError(f"{len(ids)} tokens exceed max_model_len={self.max_model_len}")
        if self.scheduler.has_unfinished():
            raise RuntimeError("logits() needs an idle engine")
        seq = Sequence(ids, SamplingParams(max_tokens=1))
        if not self.block_manager.can_allocate(seq):
            raise ValueError(f"{len(ids)} tokens do not fit the KV cache")
        self.block_manager.allocate(seq)
        try:
            return self._run([seq], is_prefill=True, all_logits=True).cpu()
        finally:
            self.block_manager.deallocate(seq)
