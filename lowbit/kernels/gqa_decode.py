"""Paged grouped-query decode attention (the Llama family): each sequence's one query per head against its cached
keys and values.

A program takes one sequence, one kv head with the query heads that share it (padded to a 16-row tile) and one split
of the context; it reads each cached key and value row once, keeps an online softmax, and writes its partial output
and log-sum-exp; splits are merged by split_kv.combine (flash-decoding for long contexts at small batch).
"""
from __future__ import annotations

import torch

from lowbit.kernels import pdl
from lowbit.kernels.split_kv import buffers, combine, default_splits
from lowbit.layers.attention import gather_slots


def gqa_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 reference: q [B, H, D], k_cache [N, page, Hkv, D], v_cache [N, page, Hkv, Dv] -> [B, H, Dv]."""
    B, H, _ = q.shape
    G = H // k_cache.shape[2]
    kf, vf = k_cache.flatten(0, 1).double(), v_cache.flatten(0, 1).double()
    out = torch.empty(B, H, v_cache.shape[-1], dtype=torch.float64)
    for b in range(B):
        slots = gather_slots(block_tables[b].cpu(), int(context_lens[b]), k_cache.shape[1])
        k, v = kf[slots], vf[slots]  # [n, Hkv, D]
        for h in range(H):
            p = torch.softmax(k[:, h // G] @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v[:, h // G]
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
    def _gqa_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr,
                           H, G, scale, stride_qb, stride_qh, stride_kslot, stride_kh, stride_vslot, stride_vh,
                           stride_bt, max_blocks,
                           D: tl.constexpr, DV: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
                           PAGE: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, SPLITS: tl.constexpr,
                           PDL: tl.constexpr):
        enter(PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        start, end = split_range(lens_ptr, b, split, BN, SPLITS)
        rows = tl.arange(0, BH)
        h_mask = rows < G
        heads = kvh * G + rows
        offs_d = tl.arange(0, D_P)
        offs_dv = tl.arange(0, DV_P)
        d_mask = offs_d < D
        dv_mask = offs_dv < DV
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        m = tl.full([BH], float("-inf"), dtype=tl.float32)
        lsum = tl.zeros([BH], dtype=tl.float32)
        acc = tl.zeros([BH, DV_P], dtype=tl.float32)
        for n0 in range(start, end, BN):
            pos = n0 + tl.arange(0, BN)
            p_mask = pos < end
            slot = page_slots(bt_ptr, b, stride_bt, max_blocks, pos, p_mask, PAGE)
            k = tl.load(k_ptr + slot[:, None] * stride_kslot + kvh * stride_kh + offs_d[None, :],
                        mask=p_mask[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(v_ptr + slot[:, None] * stride_vslot + kvh * stride_vh + offs_dv[None, :],
                        mask=p_mask[:, None] & dv_mask[None, :], other=0.0)
            m, lsum, acc = softmax_step(dot(q, tl.trans(k)), p_mask, scale, m, lsum, acc, v)
        store_split(out_ptr, lse_ptr, acc, m, lsum, (split * tl.num_programs(0) + b) * H + heads, h_mask, offs_dv,
                    dv_mask, DV)


def gqa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
               block_n: int = 32) -> torch.Tensor:
    """q [B, H, D] (one decode query per sequence), caches [N, page, Hkv, D / Dv], block_tables [B, max_blocks],
    context_lens [B] (the new token's key and value already stored) -> [B, H, Dv] in q's dtype."""
    B, H, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    Dv = v_cache.shape[-1]
    G = H // Hkv
    assert H % Hkv == 0 and G <= 16, f"{H} query heads over {Hkv} kv heads: groups of at most 16 supported"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    num_splits = num_splits or default_splits(B * Hkv)
    partial, lse = buffers(num_splits, B, H, Dv, q.device)
    if B:
        _gqa_decode_kernel[(B, Hkv, num_splits)](
            q, k_cache, v_cache, block_tables, context_lens, partial, lse,
            H, G, scale, q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1),
            v_cache.stride(2), block_tables.stride(0), block_tables.shape[1],
            D=D, DV=Dv, D_P=max(16, triton.next_power_of_2(D)), DV_P=max(16, triton.next_power_of_2(Dv)),
            PAGE=page, BH=16, BN=block_n, SPLITS=num_splits, num_warps=4, num_stages=2, **pdl.launch(q.device))
    return combine(partial, lse, q.dtype)
