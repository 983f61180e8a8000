"""CUDA graphs for decode: the model's forward for one token per sequence, captured once per batch size at start-up
and replayed every step, so a decode step costs one launch instead of hundreds.

The graphs read static input buffers (token ids, positions, cache slots, block tables, context lengths) that each
step fills; a batch runs in the smallest captured size that holds it, the spare rows pointing at a scratch cache
block that no sequence owns. Capture happens before the first request (every Triton kernel is compiled by a warm-up
forward first), all ranks together when the model is tensor or expert parallel.
"""
from __future__ import annotations

import logging
import os

import torch

from lowbit.layers.attention import Context, reset_context, set_context

log = logging.getLogger(__name__)


def warm_up_prefill(model: torch.nn.Module, max_tokens: int, num_blocks: int, block_size: int,
                    device: torch.device) -> list[int]:
    """Run a prefill of each token-count bucket the kernels' configurations are chosen by (and the sizes Triton
    specializes on: one token, multiples of 16, others), so that no request pays a compilation. The cache blocks
    written are free at start-up. With LOWBIT_AUTOTUNE=1 the configurations of every kernel layer shape and bucket
    are measured on this device first (minutes for a large model). Returns the token counts run."""
    from lowbit.kernels.tuning import M_BUCKETS, tune_model
    from lowbit.layers.attention import prefill_context
    limit = min(max_tokens, num_blocks * block_size)
    if os.environ.get("LOWBIT_AUTOTUNE") == "1":  # measure launch configurations on this GPU first
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        tuned = tune_model(model, limit, dtype)
        log.info("autotuned %d kernel shape/size buckets", len(tuned))
    counts = sorted({n for b in M_BUCKETS for n in (b, b - 1, b + 1) if 1 <= n <= limit} | {1, 2})
    batches = [[n] for n in counts]
    if limit > counts[-1]:
        # and the largest batch, as sequences of the length above: the paths only many tokens take (packed MoE
        # experts dequantized from 128 slots an expert, kernels/moe.py) compile now too
        chunk = counts[-1] - 1
        batches.append([chunk] * (limit // chunk) + ([limit % chunk] if limit % chunk else []))
    for lens in batches:
        ctx, _ = prefill_context(lens, block_size, device)
        set_context(ctx)
        try:
            with torch.inference_mode():
                positions = torch.cat([torch.arange(n, device=device) for n in lens])
                model(torch.zeros(len(positions), dtype=torch.long, device=device), positions)
        finally:
            reset_context()
    return [sum(lens) for lens in batches]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [b for b in sizes if b < max_num_seqs] + [min(max_num_seqs, 256)]


def capturable(model: torch.nn.Module) -> bool:
    """Decode can be captured when no layer reads tensors back to the host: every routed-expert layer must run in
    the fused MoE (the torch path counts tokens per expert on the host)."""
    from lowbit.layers.moe import Experts
    return all(getattr(m, "_fused", None) is not None for m in model.modules() if isinstance(m, Experts))


class DecodeGraphs:
    """One graph per batch size: the forward, the logits and their argmax (greedy decoding's token, on the device).

    A step's inputs reach the graph in two host-to-device copies from pinned buffers, filled in Python from the
    sequences: token ids, positions, cache slots and context lengths in one [4, n] buffer, the block tables in
    another; spare rows of a larger graph point at the scratch block (one token of context)."""

    def __init__(self, model: torch.nn.Module, batch_sizes: list[int], max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, device: torch.device):
        from lowbit.kernels.greedy import argmax_rows
        self.model, self.block_size = model, block_size
        self.sizes = sorted(set(batch_sizes))
        n = self.sizes[-1]
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.small = torch.zeros(4, n, dtype=torch.long, device=device)  # ids, positions, slots, context lengths
        self.small[2].fill_(self.scratch_slot)
        self.small[3].fill_(1)
        self.ids, self.pos, self.slots, self.lens = self.small.unbind(0)
        self.tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self._host_small = torch.empty(4, n, dtype=torch.long).pin_memory()
        self._host_tables = self.tables.cpu().pin_memory()
        self._np_small, self._np_tables = self._host_small.numpy(), self._host_tables.numpy()
        self._copied = torch.cuda.Event()  # the last copy out of the pinned buffers has run
        self._tokens = [(torch.zeros(n, dtype=torch.long, device=device),
                         torch.zeros(n, dtype=torch.long).pin_memory(), torch.cuda.Event()) for _ in range(2)]
        self._turn = 0
        self._ahead: tuple | None = None  # (the batch key it was launched for, its _launch result)
        self.ahead_launched = self.ahead_taken = 0  # steps launched ahead; of them, those a later call took
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def step(b):
            logits = self.model.compute_logits(self.model(self.ids[:b], self.pos[:b]))  # [b, V]
            return logits, argmax_rows(logits)
        pool = None
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            set_context(self._context(b))
            try:
                step(b)  # warm-up: compiles the kernels outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                set_context(self._context(b))
                with torch.cuda.graph(graph, pool=pool):
                    out = step(b)
            finally:
                reset_context()
            pool = graph.pool()
            self.graphs[b], self.outputs[b] = graph, out
        torch.cuda.synchronize(device)

    def _context(self, b: int) -> Context:
        return Context(is_prefill=False, slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                       context_lens=self.lens[:b], block_size=self.block_size)

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, seqs: list, ahead: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of the sequences (each adds its last token) -> (logits [B, V] in the model's dtype, a view
        of the graph's buffer valid until the next replay; greedy argmax ids [B] on the host).

        ahead: then also launch the step after this one (each sequence one token longer, its input this step's
        argmax, taken on the device) before returning, so the GPU runs it while the host reads and handles this
        step's tokens. The caller has reserved its cache slots (BlockManager.reserve_next) and reads no logits (the
        step ahead overwrites them). A later call whose sequences are those of the step ahead, at its lengths and
        block tables, takes its result instead of launching; any other call drops it (its cache writes are those the
        step that replaces it writes again, or in blocks the sequence has given up)."""
        launched, self._ahead = self._ahead, None
        if launched is not None and launched[0] == _batch_key(seqs, 0, self.block_size):
            step = launched[1]
            self.ahead_taken += 1
        else:
            step = self._launch(seqs, 0)
        if ahead:
            self._ahead = (_batch_key(seqs, 1, self.block_size), self._launch(seqs, 1, step[1]))
            self.ahead_launched += 1
        logits, _, host, done = step
        done.synchronize()
        return logits, host.clone()

    def _launch(self, seqs: list, extra: int, ids: torch.Tensor | None = None) -> tuple:
        """Replay the graph for the sequences grown by `extra` tokens (their inputs then `ids` [B] on the device)
        -> (logits [B, V], argmax [B] on the device and on the host, the event after its copy to the host)."""
        B = len(seqs)
        b = next(s for s in self.sizes if s >= B)
        bs = self.block_size
        self._copied.synchronize()  # the pinned buffers are free again (a follower rank never reads a token back)
        hs, ht = self._np_small, self._np_tables
        for i, seq in enumerate(seqs):
            n = len(seq) + extra
            table = seq.block_table
            hs[0, i], hs[1, i], hs[3, i] = seq.last_token, n - 1, n
            hs[2, i] = table[(n - 1) // bs] * bs + (n - 1) % bs
            ht[i, :len(table)] = table
        if B < b:  # spare rows: one token of context in the scratch block
            hs[0, B:b], hs[1, B:b], hs[2, B:b], hs[3, B:b] = 0, 0, self.scratch_slot, 1
            ht[B:b, 0] = self.scratch_block
        self.small.copy_(self._host_small, non_blocking=True)
        self.tables[:b].copy_(self._host_tables[:b], non_blocking=True)
        self._copied.record()
        if ids is not None:
            self.ids[:B].copy_(ids)
        self.graphs[b].replay()
        logits, greedy = self.outputs[b]
        # the argmax leaves the graph's buffer (a step ahead replays over it) for one of two that steps alternate
        self._turn ^= 1
        dev, host, done = self._tokens[self._turn]
        dev[:B].copy_(greedy[:B])
        host[:B].copy_(dev[:B], non_blocking=True)
        done.record()
        return logits[:B], dev[:B], host[:B], done


def _batch_key(seqs: list, extra: int, block_size: int) -> list[tuple]:
    """What a decode step's inputs are made of, for each sequence grown by `extra` tokens: its id, length, and the
    blocks the step reads and writes (those up to its last token's). Not the blocks after them: the next call's
    reservation for its own step ahead (BlockManager.reserve_next) appends one at every block boundary, before it
    asks for the step launched ahead; with the whole table in the key that step was dropped and run again there
    (V2-Lite, H100, 2026-11-25: 6 of 126 steps at 16-token blocks, about 2 ms each, 5% of batch-1 decode)."""
    return [(s.seq_id, len(s) + extra, tuple(s.block_table[:-(-(len(s) + extra) // block_size)])) for s in seqs]
