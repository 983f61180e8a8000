"""Round-to-nearest quantization, and the scale / rounding primitives GPTQ shares with it.

Conventions follow compressed-tensors so that its decompressors read our tensors back: symmetric int scales are
absmax / ((qmax - qmin) / 2) (absmax / 7.5 for int4), asymmetric ones (max - min) / (qmax - qmin) with a signed
integer zero point, 0 always representable; fp8 scales are absmax / 448. Scales are rounded to their storage
dtype before any value is quantized with them, so the stored scale is exactly the one the values were made for.
"""
from __future__ import annotations

import torch

from lowbit.quant.formats import FP8_MAX, QuantizedWeight, int_range
from lowbit.quant.schemes import QuantArgs


def column_groups(in_features: int, args: QuantArgs) -> list[tuple[int, int]]:
    """The [start, end) column ranges that share one scale per row (per row block for block strategy)."""
    if args.strategy == "group":
        step = args.group_size
    elif args.strategy == "block":
        step = args.block_structure[1]
    else:  # channel / tensor: one scale over all columns
        step = in_features
    return [(s, min(s + step, in_features)) for s in range(0, in_features, step)]


def _nonzero(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales stored in `dtype`, zeros (an all-zero group) replaced by that dtype's epsilon as compressed-tensors
    does, returned in float32."""
    eps = torch.finfo(dtype).eps
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    return scale.to(dtype).float()


def group_qparams(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype,
                  tensor_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of one column group w [out, g] -> ([out] float32, [out] int8 | None).

    Block strategy shares a scale across each block of rows; the result is still one value per row.
    """
    out_f = w.shape[0]
    if args.type == "float":
        if args.strategy == "block":
            bo = args.block_structure[0]
            amax = torch.nn.functional.pad(w.abs().amax(dim=1), (0, -out_f % bo)).view(-1, bo).amax(dim=1)
            amax = amax.repeat_interleave(bo)[:out_f]  # [out]
        elif args.strategy == "tensor":
            amax = w.abs().amax().expand(out_f)
        else:
            amax = w.abs().amax(dim=1)
        return _nonzero(amax / FP8_MAX, scale_dtype), None
    qmin, qmax = int_range(args.num_bits)
    if args.symmetric:
        amax = w.abs().amax(dim=1) if args.strategy != "tensor" else w.abs().amax().expand(out_f)
        return _nonzero(amax / ((qmax - qmin) / 2), scale_dtype), None
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = _nonzero((hi - lo) / (qmax - qmin), scale_dtype)
    zp = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int8)
    return scale, zp


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                    args: QuantArgs) -> torch.Tensor:
    """w [out, k] with per-row scale [out] (and zero point) -> quantized values [out, k] (int8 or float8)."""
    x = w / scale[:, None]
    if args.type == "float":
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    qmin, qmax = int_range(args.num_bits)
    if zp is not None:
        x = x + zp[:, None].float()
    return torch.round(x).clamp(qmin, qmax).to(torch.int8)


def dequantize_columns(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """Quantized values [out, k] with per-row scale [out] -> float32."""
    x = q.float()
    if zp is not None:
        x = x - zp[:, None].float()
    return x * scale[:, None]


def stored_qparams(scales: list[torch.Tensor], zps: list[torch.Tensor | None], out_features: int,
                   args: QuantArgs, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group per-row scales (one [out] tensor per column group, in order) -> the stored scale / zero point."""
    scale = torch.stack(scales, dim=1)  # [out, groups]
    if args.strategy == "block":
        scale = scale[::args.block_structure[0]]  # [out_blocks, in_blocks]
    elif args.strategy == "tensor":
        scale = scale[:1, 0]
    zp = torch.stack(zps, dim=1) if zps and zps[0] is not None else None
    return scale.to(scale_dtype).contiguous(), zp


def rtn_quantize(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Round every weight of w [out, in] to its nearest level, one min-max scale per group."""
    w = w.float()
    out_f, in_f = w.shape
    if args.strategy == "group" and in_f % args.group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of the group size {args.group_size} "
                         f"(choose one with --group-size)")
    values = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn if args.type == "float" else torch.int8)
    scales, zps = [], []
    for s, e in column_groups(in_f, args):
        scale, zp = group_qparams(w[:, s:e], args, scale_dtype)
        values[:, s:e] = quantize_values(w[:, s:e], scale, zp, args)
        scales.append(scale)
        zps.append(zp)
    scale, zp = stored_qparams(scales, zps, out_f, args, scale_dtype)
    return QuantizedWeight(values, scale, zp, args)
