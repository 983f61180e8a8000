"""One row against 16-bit weights (bf16 / fp16 dense layers at batch-1 decode): x [1, K] @ W [N, K]^T.

The matrix library's kernel for one row took 7.7 us for V2-Lite's fused q / kv_a product (15 MB) and 5.9 us for its
o_proj (8.4 MB) on an H100 (2026-11-24, profile_decode.py), 65% and 47% of copy bandwidth. Here a program owns BN
output rows and TILES K tiles of BK (all its loads issued together, no chain of them), the K splits' partial sums
added by the last program of a row block (as gemv_packed.py's): products exact in float32, summed in float32,
rounded once.
"""
from __future__ import annotations

import os

import torch

from lowbit.kernels import cdiv

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _gemv16_kernel(x_ptr, w_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, stride_wn,
                       BN: tl.constexpr, BK: tl.constexpr, TILES: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        n_mask = rows < N
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        for i in tl.static_range(TILES):
            cols = (pid_k * TILES + i) * BK + tl.arange(0, BK)
            k_mask = cols < K
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
            x = tl.load(x_ptr + cols, mask=k_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1)
        if SPLIT_K > 1:
            # each split stores its partial sums; the last of a row block's splits (a counter per block) adds them
            # in split order and writes the rows, then sets the counter back to zero for the next launch
            tl.store(ws_ptr + pid_k * N + rows, out, mask=n_mask)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            last = (tl.zeros_like(rows) + done) == SPLIT_K - 1  # (a tensor: Triton's interpreter wants one)
            out = tl.zeros([BN], dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                out += tl.load(ws_ptr + sk * N + rows, mask=n_mask & last, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid_n, 0, mask=done == SPLIT_K - 1)
            n_mask = n_mask & last
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=n_mask)


BK = 256  # a K tile: 16-byte loads, 32 lanes along K
BN = 16
ENABLED = os.environ.get("LOWBIT_GEMV", "1") != "0"  # as gemv_packed's: 0 keeps the matrix library


MAX_N_OVER_K = 8  # wider layers (the dense MLP's gate_up, the LM head) keep the matrix library, near copy there


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T runs here: one row on a GPU's kernel path, 16-bit x and weight of one dtype, unit
    strides, at most MAX_N_OVER_K outputs per input."""
    from lowbit.kernels.linear import kernels_enabled
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1
            and weight.shape[0] <= MAX_N_OVER_K * weight.shape[1] and ENABLED and kernels_enabled(x.device))


def gemv(x: torch.Tensor, weight: torch.Tensor, tiles: int | None = None, bn: int = BN,
         num_warps: int = 4) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T -> [1, N] in x's dtype. tiles: K tiles a program (None: two, or more where the
    row blocks alone give the chip over eight programs a multiprocessor)."""
    from lowbit.kernels.rows import split_buffers
    from lowbit.kernels.tuning import num_sms
    N, K = weight.shape
    assert x.shape == (1, K) and x.stride(1) == 1 and weight.stride(1) == 1, f"x {tuple(x.shape)} vs {tuple(weight.shape)}"
    k_tiles = cdiv(K, BK)
    blocks = cdiv(N, bn)
    if tiles is None:
        tiles = 2
        while blocks * cdiv(k_tiles, tiles) > 8 * num_sms() and tiles < k_tiles:
            tiles *= 2
    tiles = min(tiles, k_tiles)
    split = cdiv(k_tiles, tiles)
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    ws, counters = split_buffers(1, N, split, blocks, x.device) if split > 1 else (out, out)
    _gemv16_kernel[(blocks, split)](x, weight, out, ws, counters, N, K, weight.stride(0),
                                     BN=bn, BK=BK, TILES=tiles, SPLIT_K=split, num_warps=num_warps)
    return out
