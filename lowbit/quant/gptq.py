"""GPTQ (Frantar et al., 2022): quantize a weight one column at a time, spreading each column's rounding error over
the columns not yet quantized so that the layer's output on the calibration inputs moves as little as possible.

Pure functions, no I/O: `hessian` from a linear layer's calibration inputs, `gptq_quantize` from the weight and
that Hessian. The loop is the paper's: damping 1% of the mean diagonal (raised tenfold while the Cholesky factor
fails), the upper Cholesky factor of H^-1, blocks of 128 columns updated lazily, and group-wise scales computed
from the error-updated weights as each group's first column is reached. With act-order the columns are visited
in order of decreasing Hessian diagonal while groups stay the original contiguous column ranges (compressed-tensors'
`actorder: weight`), their scales fixed before the loop, so the checkpoint needs no g_idx.
"""
from __future__ import annotations

import torch

from lowbit.quant.formats import QuantizedWeight
from lowbit.quant.rtn import column_groups, dequantize_columns, group_qparams, quantize_values, stored_qparams
from lowbit.quant.schemes import QuantArgs


def hessian(x: torch.Tensor) -> torch.Tensor:
    """Calibration inputs x [n, in] of one linear layer -> H = 2/n x^T x [in, in], float32."""
    x = x.float()
    return (x.t() @ x) * (2.0 / max(x.shape[0], 1))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising the damping until H is positive definite."""
    mean_diag = h.diagonal().mean().item()
    n = h.shape[0]
    for attempt in range(6):
        d = damp * (10 ** attempt)
        hd = h + torch.eye(n, dtype=h.dtype) * (d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_solve(torch.eye(n, dtype=h.dtype), chol)  # (faster than cholesky_inverse)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return upper, d
    raise ValueError("the Hessian is not positive definite even with 1000x damping")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype = torch.bfloat16,
                  damp: float = 0.01, block_size: int = 128, actorder: bool = False,
                  stats: dict | None = None) -> QuantizedWeight:
    """Quantize w [out, in] given the Hessian h [in, in] of its inputs; same layout as rtn_quantize. `stats`, if
    given, receives the damping used."""
    w = w.float().clone()
    h = h.float().clone()
    out_f, in_f = w.shape
    groups = column_groups(in_f, args)
    if args.strategy == "group" and in_f % args.group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of the group size {args.group_size} "
                         f"(choose one with --group-size)")
    dead = h.diagonal() == 0  # inputs that were always zero: any weight there is free
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group_of = torch.empty(in_f, dtype=torch.long)
    for g, (s, e) in enumerate(groups):
        group_of[s:e] = g
    per_row = [group_qparams(w[:, s:e], args, scale_dtype) for s, e in groups] if (
        actorder or len(groups) == 1) else None  # fixed before the loop: channel strategy, or act-order

    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if actorder else torch.arange(in_f)
    w, h = w[:, perm], h[perm][:, perm]
    hinv, used = _inverse_cholesky(h, damp)
    if stats is not None:
        stats["damp"] = used

    # a whole number of groups per block, so that a group's scale is taken from the error-updated block
    width = groups[0][1] - groups[0][0]
    if per_row is None:
        block_size = width * max(1, block_size // width)
    values = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn if args.type == "float" else torch.int8)
    scales: list = [None] * len(groups)
    zps: list = [None] * len(groups)
    if per_row is not None:
        scales, zps = [p[0] for p in per_row], [p[1] for p in per_row]

    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        wb = w[:, b0:b1].clone()  # [out, B]
        errb = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = int(perm[b0 + i])
            g = int(group_of[col])
            if scales[g] is None:  # first column of a group, visited in order: scale from the updated weights
                s, e = groups[g]
                scales[g], zps[g] = group_qparams(wb[:, i:i + (e - s)], args, scale_dtype)
            q = quantize_values(wb[:, i:i + 1], scales[g], zps[g], args)  # [out, 1]
            values[:, col] = q[:, 0]
            err = (wb[:, i] - dequantize_columns(q, scales[g], zps[g])[:, 0]) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errb[:, i] = err
        w[:, b1:] -= errb @ hinv[b0:b1, b1:]

    scale, zp = stored_qparams(scales, zps, out_f, args, scale_dtype)
    return QuantizedWeight(values, scale, zp, args)
