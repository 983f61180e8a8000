"""Greedy decoding's argmax over the vocabulary, inside the decode CUDA graph: every row of the logits cut into
chunks, each chunk's maximum and its first index, then the first chunk holding the row's maximum. torch.argmax runs
one block per row (22.8 us for one row of 102,400 float32 logits on an H100, 2026-11-23); two launches of many
programs take a few.

Ties go to the lowest index, as torch.argmax's do.
"""
from __future__ import annotations

import torch

from lowbit.kernels import pdl, triton_available

CHUNK = 2048  # vocabulary entries per program of the first pass


def argmax_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> int64 [B]."""
    return logits.argmax(dim=-1)


if triton_available():
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter

    @triton.jit
    def _chunk_max_kernel(x_ptr, max_ptr, idx_ptr, V, stride_x, num_chunks, CHUNK: tl.constexpr, PDL: tl.constexpr):
        enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        cols = c * CHUNK + tl.arange(0, CHUNK)
        v = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m = tl.max(v, axis=0)
        first = tl.min(tl.where(v == m, cols, V), axis=0)  # the lowest index holding the maximum
        tl.store(max_ptr + row * num_chunks + c, m)
        tl.store(idx_ptr + row * num_chunks + c, first)

    @triton.jit
    def _pick_kernel(max_ptr, idx_ptr, out_ptr, num_chunks, C_P: tl.constexpr, PDL: tl.constexpr):
        enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, C_P)
        mask = c < num_chunks
        m = tl.load(max_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
        idx = tl.load(idx_ptr + row * num_chunks + c, mask=mask, other=0)
        best = tl.max(m, axis=0)
        # chunks are in index order: the first chunk with the maximum has the lowest index
        first = tl.min(tl.where(mask & (m == best), c, C_P), axis=0)
        tl.store(out_ptr + row, tl.sum(tl.where(c == first, idx, 0), axis=0).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """argmax_rows_ref in two launches, no host synchronisation: logits [B, V] (unit stride in V) -> int64 [B]."""
    B, V = logits.shape
    assert logits.stride(1) == 1, "rows must be contiguous"
    chunks = triton.cdiv(V, CHUNK)
    maxes = torch.empty(B, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(B, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B:
        _chunk_max_kernel[(B, chunks)](logits, maxes, idx, V, logits.stride(0), chunks, CHUNK=CHUNK, num_warps=4,
                                       **pdl.launch(logits.device))
        _pick_kernel[(B,)](maxes, idx, out, chunks, C_P=max(16, triton.next_power_of_2(chunks)), num_warps=1,
                           **pdl.launch(logits.device))
    return out
