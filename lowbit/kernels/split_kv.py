"""What the paged decode kernels (mla_decode, gqa_decode) share: a program's split of its sequence's context, the
cache slots of a page-table tile, one online-softmax step, writing a split's partial output and log-sum-exp, and
merging the splits (flash-decoding) in one launch: torch's softmax over the splits, product, sum and cast were four
kernels per layer at batch-1 decode, the softmax alone 7.7 us on an H100 (profile_decode.py, 2026-11-23)."""
from __future__ import annotations

import torch

from lowbit.kernels import pdl

try:
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def dot(a, b):
        """a @ b; float32 operands stay IEEE float32 (Triton's default would be tf32)."""
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def split_range(lens_ptr, b, split, BN: tl.constexpr, SPLITS: tl.constexpr):
        """[start, end) of sequence b's context that split `split` of SPLITS covers (whole BN tiles)."""
        length = tl.load(lens_ptr + b)
        per_split = tl.cdiv(tl.cdiv(length, BN), SPLITS) * BN
        start = split * per_split
        return start, tl.minimum(start + per_split, length)

    @triton.jit
    def page_slots(bt_ptr, b, stride_bt, max_blocks, pos, p_mask, PAGE: tl.constexpr):
        """Flat cache slots (int64) of positions `pos` of sequence b through its block table."""
        blk = tl.load(bt_ptr + b * stride_bt + pos // PAGE, mask=p_mask & (pos // PAGE < max_blocks), other=0)
        return blk.to(tl.int64) * PAGE + pos % PAGE

    @triton.jit
    def softmax_step(s, p_mask, scale, m, lsum, acc, v):
        """Fold one tile of scores s [rows, BN] (masked columns dropped) and values v [BN, D] into the running max,
        sum and weighted values."""
        s = tl.where(p_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        return m_new, lsum, acc

    @triton.jit
    def store_split(out_ptr, lse_ptr, acc, m, lsum, rows, row_mask, offs_d, d_mask, D: tl.constexpr):
        """Write a split's normalised output rows [rows, D] and log-sum-exp; a split past the end of a short context
        (nothing summed) writes zeros and -inf, so that it weighs nothing in `combine`."""
        empty = lsum == 0.0
        out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, lsum)[:, None])
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, lsum)))
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out, mask=row_mask[:, None] & d_mask[None, :])
        tl.store(lse_ptr + rows, lse, mask=row_mask)


def default_splits(programs: int) -> int:
    """Enough context splits to fill the chip when the batch alone does not."""
    from lowbit.kernels.tuning import num_sms
    return max(1, min(16, num_sms() // max(programs, 1)))


def buffers(splits: int, B: int, H: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(splits, B, H, D, dtype=torch.float32, device=device),
            torch.empty(splits, B, H, dtype=torch.float32, device=device))


def combine_ref(partial: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """partial [S, B, H, D], lse [S, B, H] -> the softmax-weighted sum over splits [B, H, D] (float32)."""
    if partial.shape[0] == 1:
        return partial[0]
    w = torch.softmax(lse, dim=0)  # splits that saw nothing have lse -inf: weight 0
    return (partial * w[..., None]).sum(0)


if triton is not None:
    @triton.jit
    def _combine_kernel(partial_ptr, lse_ptr, out_ptr, rows, D, S: tl.constexpr, S_P: tl.constexpr,
                        BR: tl.constexpr, D_P: tl.constexpr, PDL: tl.constexpr):
        """BR (sequence, head) rows: their S partial outputs weighted by softmax(lse) over the splits."""
        enter(PDL)
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        r_mask = r < rows
        s = tl.arange(0, S_P)
        lse = tl.load(lse_ptr + s[:, None] * rows + r[None, :], mask=(s[:, None] < S) & r_mask[None, :],
                      other=float("-inf"))  # [S_P, BR]
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row no split saw: every weight 0, output 0
        w = tl.exp(lse - m[None, :])
        total = tl.sum(w, axis=0)
        w = w / tl.where(total == 0.0, 1.0, total)[None, :]
        d = tl.arange(0, D_P)
        mask = r_mask[:, None] & (d[None, :] < D)
        acc = tl.zeros([BR, D_P], dtype=tl.float32)
        for i in tl.static_range(S):
            p = tl.load(partial_ptr + (i * rows + r[:, None]) * D + d[None, :], mask=mask, other=0.0)
            wi = tl.sum(tl.where(s[:, None] == i, w, 0.0), axis=0)  # [BR]
            acc += p * wi[:, None]
        tl.store(out_ptr + r[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine(partial: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """combine_ref in one launch, written in dtype: partial [S, B, H, D], lse [S, B, H] (contiguous)."""
    S, B, H, D = partial.shape
    out = torch.empty(B, H, D, dtype=dtype, device=partial.device)
    rows = B * H
    if rows:
        d_p = triton.next_power_of_2(D)
        br = max(1, min(4096 // d_p, triton.next_power_of_2(triton.cdiv(rows, 128))))  # 128+ programs when it can
        _combine_kernel[(triton.cdiv(rows, br),)](partial, lse, out, rows, D, S=S, S_P=triton.next_power_of_2(S),
                                                   BR=br, D_P=d_p, num_warps=4, **pdl.launch(partial.device))
    return out
