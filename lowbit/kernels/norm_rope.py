"""RMSNorm and rotary embedding, one launch each: the torch forms take about seven kernels per RMSNorm and seven per
rotated tensor, and at batch-1 decode a layer's time goes to launches, not bytes (benchmarks/profile_decode.py: 425
kernels per token for four V2-Lite layers on an H100, 2026-11-23).

Both compute in float32 and round once; the torch references (layers/norm.py, layers/rotary.py) round after each op.
"""
from __future__ import annotations

import torch

from lowbit.kernels import act_quant, pdl, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from lowbit.kernels.act_quant import quant_group_once
    from lowbit.kernels.pdl import enter

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, q_ptr, s_ptr, N, stride_x, stride_r, stride_o,
                         eps, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, INT8_ROWS: tl.constexpr,
                         PDL: tl.constexpr):
        """One row: x / sqrt(mean(x^2) + eps), rounded to x's dtype, times the weight (as the HF models do).
        HAS_RES: x + residual first, rounded to x's dtype as torch's add rounds, and written to sum_ptr.
        INT8_ROWS: the output row also quantized to int8 per token (act_quant's _quant_rows_kernel on the rounded
        output: the same codes and scale) into q_ptr [rows, N] and s_ptr [rows]."""
        enter(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * stride_x + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=0) / N + eps)
        y = (xf * inv).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        o = (w * y).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + cols, o, mask=mask)
        if INT8_ROWS:
            quant_group_once(tl.where(mask, o.to(tl.float32), 0.0), mask, q_ptr + row * N + cols, s_ptr + row, False)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, stride_xt, stride_xh, stride_ot, stride_oh, stride_c,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, BH: tl.constexpr, INTERLEAVED: tl.constexpr,
                     PDL: tl.constexpr):
        """One token, BH heads: out = [x1 cos - x2 sin, x2 cos + x1 sin], x1/x2 the even/odd features
        (interleaved) or the two halves."""
        enter(PDL)
        t = tl.program_id(0)
        h = tl.program_id(1) * BH + tl.arange(0, BH)
        i = tl.arange(0, BLOCK)
        mask = (h[:, None] < H) & (i[None, :] < HALF)
        base = x_ptr + t * stride_xt + h[:, None] * stride_xh
        if INTERLEAVED:
            x1 = tl.load(base + 2 * i[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + 2 * i[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(base + i[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * stride_c + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_c + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        ob = out_ptr + t * stride_ot + h[:, None] * stride_oh + i[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(ob, (x1 * c - x2 * s).to(ty), mask=mask)
        tl.store(ob + HALF, (x2 * c + x1 * s).to(ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             int8_rows: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., N] (rows with unit stride) -> the same shape, in the dtype `weight * x` has in torch. With a residual
    (the decoder's running sum, same shape and dtype): (the norm of x + residual, x + residual), one launch where
    the add and the norm were two. int8_rows (x [T, N]): the output also quantized to int8 per token in the same
    launch, what act_quant.int8_per_token returns for it (act_quant.attach_int8_rows): the int8 layers reading it
    (w8a8, w4a8-int8) then skip their own quantization launch."""
    N = x.shape[-1]
    assert weight.shape == (N,) and x.stride(-1) == 1, f"x {tuple(x.shape)} vs weight {tuple(weight.shape)}"
    x2 = x.reshape(-1, N)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res = summed = x2
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
        res = residual.reshape(-1, N)
        summed = torch.empty_like(x2)
    int8_rows = int8_rows and x.dim() == 2
    q = s = out
    if int8_rows:
        q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        s = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(x2.shape[0],)](x2, res, summed, weight, out, q, s, N, x2.stride(0), res.stride(0),
                                         out.stride(0), eps, BLOCK=block, HAS_RES=residual is not None,
                                         INT8_ROWS=int8_rows, num_warps=min(16, max(1, block // 512)),
                                         **pdl.launch(x2.device))
    normed = out.view(x.shape)
    if int8_rows:
        act_quant.attach_int8_rows(normed, q, s)
    if residual is None:
        return normed
    return normed, summed.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, H, dim] (unit stride in dim); cos / sin [T, dim/2] -> rotated [T, H, dim], contiguous, x's dtype."""
    T, H, D = x.shape
    assert D % 2 == 0 and x.stride(2) == 1 and cos.shape == (T, D // 2) and cos.stride() == sin.stride(), \
        f"x {tuple(x.shape)}, cos {tuple(cos.shape)}"
    out = torch.empty(T, H, D, dtype=x.dtype, device=x.device)
    if T and H:
        block = triton.next_power_of_2(D // 2)
        bh = min(triton.next_power_of_2(H), max(1, 4096 // block))  # up to 4096 pairs a program
        _rope_kernel[(T, triton.cdiv(H, bh))](x, cos, sin, out, H, x.stride(0), x.stride(1), out.stride(0),
                                              out.stride(1), cos.stride(0), HALF=D // 2, BLOCK=block, BH=bh,
                                              INTERLEAVED=interleaved, num_warps=4 if bh * block >= 1024 else 1,
                                              **pdl.launch(x.device))
    return out
