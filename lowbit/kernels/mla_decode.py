"""Paged MLA decode in the absorbed form: each query (one per sequence) against its cached latents and rope keys.

The cache holds [latent (R) | rope key (DR)] per token. A program takes one sequence, a block of 16 heads and one
split of the context, and reads each cached row once for all its heads: scores = q_latent . latent + q_pe . k_pe,
an online softmax, and the latent rows weighted by it (the caller applies W_UV). With several splits
(flash-decoding, for long contexts at small batch) each writes its partial output and log-sum-exp and `combine`
merges them.
"""
from __future__ import annotations

import torch

from lowbit.kernels import cdiv, pdl
from lowbit.kernels.split_kv import buffers, combine, default_splits
from lowbit.layers.attention import gather_slots


def mla_decode_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, scale: float, rank: int) -> torch.Tensor:
    """float64 reference: q [B, H, R + DR], kv_cache [N, page, 1, R + DR] -> [B, H, R]."""
    B, H, _ = q.shape
    flat = kv_cache.reshape(-1, kv_cache.shape[-1]).double()
    out = torch.empty(B, H, rank, dtype=torch.float64)
    for b in range(B):
        kv = flat[gather_slots(block_tables[b].cpu(), int(context_lens[b]), kv_cache.shape[1])]  # [n, R + DR]
        p = torch.softmax((q[b].double() @ kv.t()) * scale, dim=-1)  # [H, n]
        out[b] = p @ kv[:, :rank]
    return out


try:
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter
except ImportError:
    triton = None

if triton is not None:
    from lowbit.kernels.split_kv import dot, page_slots, softmax_step, split_range, store_split

    @triton.jit
    def _mla_decode_kernel(q_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr,
                           H, scale, stride_qb, stride_qh, stride_cache, stride_bt, max_blocks,
                           R: tl.constexpr, DR: tl.constexpr, R_P: tl.constexpr, DR_P: tl.constexpr,
                           PAGE: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr,
                           PDL: tl.constexpr):
        enter(PDL)
        b = tl.program_id(0)
        hb = tl.program_id(1)
        split = tl.program_id(2)
        start, end = split_range(lens_ptr, b, split, BN, SPLITS)
        heads = hb * BH + tl.arange(0, BH)
        h_mask = heads < H
        offs_r = tl.arange(0, R_P)
        offs_dr = tl.arange(0, DR_P)
        r_mask = offs_r < R
        dr_mask = offs_dr < DR
        q_base = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q_lat = tl.load(q_base + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
        q_pe = tl.load(q_base + R + offs_dr[None, :], mask=h_mask[:, None] & dr_mask[None, :], other=0.0)
        m = tl.full([BH], float("-inf"), dtype=tl.float32)
        lsum = tl.zeros([BH], dtype=tl.float32)
        acc = tl.zeros([BH, R_P], dtype=tl.float32)
        for n0 in range(start, end, BN):
            pos = n0 + tl.arange(0, BN)
            p_mask = pos < end
            rows = page_slots(bt_ptr, b, stride_bt, max_blocks, pos, p_mask, PAGE) * stride_cache
            kv = tl.load(cache_ptr + rows[:, None] + offs_r[None, :], mask=p_mask[:, None] & r_mask[None, :],
                         other=0.0)  # [BN, R]
            kpe = tl.load(cache_ptr + rows[:, None] + R + offs_dr[None, :],
                          mask=p_mask[:, None] & dr_mask[None, :], other=0.0)  # [BN, DR]
            s = dot(q_lat, tl.trans(kv)) + dot(q_pe, tl.trans(kpe))
            m, lsum, acc = softmax_step(s, p_mask, scale, m, lsum, acc, kv)
        store_split(out_ptr, lse_ptr, acc, m, lsum, (split * tl.num_programs(0) + b) * H + heads, h_mask, offs_r,
                    r_mask, R)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               scale: float, rank: int, num_splits: int | None = None, block_n: int = 32) -> torch.Tensor:
    """q [B, H, R + DR] (one decode query per sequence), kv_cache [N, page, 1, R + DR], block_tables [B, max_blocks],
    context_lens [B] (the new token's row already stored) -> [B, H, R] in q's dtype."""
    B, H, D = q.shape
    page = kv_cache.shape[1]
    assert kv_cache.shape[-1] == D and kv_cache.is_contiguous(), f"cache {tuple(kv_cache.shape)} vs q {q.shape}"
    assert q.stride(2) == 1
    num_splits = num_splits or default_splits(B * cdiv(H, 16))
    partial, lse = buffers(num_splits, B, H, rank, q.device)
    if B:
        rope = D - rank
        _mla_decode_kernel[(B, cdiv(H, 16), num_splits)](
            q, kv_cache, block_tables, context_lens, partial, lse,
            H, scale, q.stride(0), q.stride(1), kv_cache.stride(1), block_tables.stride(0), block_tables.shape[1],
            R=rank, DR=rope, R_P=max(16, triton.next_power_of_2(rank)), DR_P=max(16, triton.next_power_of_2(rope)),
            PAGE=page, BH=16, BN=block_n, SPLITS=num_splits, num_warps=4, num_stages=2, **pdl.launch(q.device))
    return combine(partial, lse, q.dtype)
