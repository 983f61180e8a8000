"""The packed int4 / int8 weights that matmul_packed.py's GEMM and gemv_packed.py's GEMV read: their layouts, `repack`
from a checkpoint's values, and the way back (`values`, `unpack`).

Tile-planar layout. `repack` turns compressed-tensors' pack-quantized tensors (values packed along the input
dimension, word w holding k = per_word * w + j in its j-th field) into tiles of TILE_K input features: word w of a
row's tile holds the values k = t*TILE_K + j*PLANE + w for j = 0..per_word-1 (PLANE = TILE_K / per_word), so each
shift j of a tile's words gives a *contiguous* plane of PLANE input features. K is padded to a multiple of TILE_K
with zero weights. Scales are float32 [E, groups, N]; zero points int32 [E, groups, N], stored plus 2^(bits-1).

Paired layout (int4 only, `pair`): each 16-bit half of the tile-planar words moved so that a word holds two
*adjacent* input features of four planes: word p of a tile's first half (p < PLANE / 2) is the low halves of planar
words 2p and 2p + 1 (planes 0-3 at k = 2p in bits 0-15, at k = 2p + 1 in bits 16-31), word p of its second half their
high halves (planes 4-7). One logic op, (word >> 4i) & 0x000F000F | magic, then makes the two 16-bit weights
(k, k + 1) of plane i (or 4 + i) that a matrix-product operand register holds, and one packed subtract takes their
zero point: the tensor cores' operand without the per-value shift, mask and pairing (PRMT) the planar layout needs
(the one-token MoE's main loop compiled for sm_90a by Triton 3.6, w4a16 V2-Lite experts, `kernel_sass.py --paired`:
with 64 weight rows a program as the first operand, 3.1 instructions a weight for gate_up and 3.5 for down, where the
planar layout's engine configuration takes 4.9 and 4.5). The fused MoE's symmetric int4 experts take it by default
(`experts_layout`; LOWBIT_INT4_PAIRED=0 keeps them planar). The GEMV reads the planar layout only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.kernels import cdiv


@dataclass
class PackedWeight:
    """Experts' (or one layer's) packed weights in the kernel's layout."""
    words: torch.Tensor  # int32 [E, N, Kp / per_word], tile-planar
    scales: torch.Tensor  # float32 [E, groups, N]
    zeros: torch.Tensor | None  # int32 [E, groups, N]: zero point + 2^(bits-1) (None: symmetric)
    bits: int
    group_size: int  # 0: one scale per output channel
    n: int
    k: int
    tile_k: int
    paired: bool = False  # the paired layout (see the module's docstring; int4 only)

    @property
    def num_experts(self) -> int:
        return self.words.shape[0]


def default_tile_k(bits: int) -> int:
    # a plane of 32 input features: the K of one FP8 / int8 tensor-core product
    return 256 if bits == 4 else 128


def _swap_halves(words: torch.Tensor, plane: int, to_paired: bool) -> torch.Tensor:
    """Tile-planar words [..., Kw] <-> the paired layout: a permutation of their 16-bit halves (a little-endian
    int32 is its low half, then its high half)."""
    *lead, kw = words.shape
    h = words.contiguous().view(torch.int16).reshape(*lead, kw // plane, plane // 2, 2, 2)  # [.., T, p, w&1, half]
    if to_paired:  # planar [T, p, w&1, half] -> paired [T, half, p, w&1]
        h = h.permute(*range(len(lead)), -4, -1, -3, -2)
    else:  # paired words [T, half, p, w&1] (the same view of their halves) -> planar [T, p, w&1, half]
        h = h.reshape(*lead, kw // plane, 2, plane // 2, 2).permute(*range(len(lead)), -4, -2, -1, -3)
    return h.contiguous().view(torch.int32).reshape(*lead, kw)


def pair(pw: PackedWeight) -> PackedWeight:
    """An int4 PackedWeight in the paired layout (the same values, scales and zero points)."""
    assert pw.bits == 4, "the paired layout is int4's"
    if pw.paired:
        return pw
    words = _swap_halves(pw.words, pw.tile_k // 8, to_paired=True)
    return PackedWeight(words, pw.scales, pw.zeros, pw.bits, pw.group_size, pw.n, pw.k, pw.tile_k, paired=True)


def planar_words(pw: PackedWeight) -> torch.Tensor:
    """pw's words in the tile-planar layout."""
    return _swap_halves(pw.words, pw.tile_k // 8, to_paired=False) if pw.paired else pw.words


def repack(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
           group_size: int, tile_k: int | None = None, paired: bool = False) -> PackedWeight:
    """Signed integer weights [E, N, K] (int8 holding `bits`-bit values), scales [E, N, groups] (groups = 1 for per
    channel), zero points like scales or None -> the kernel's PackedWeight (paired: in the paired layout)."""
    tile_k = tile_k or default_tile_k(bits)
    per_word = 32 // bits
    plane = tile_k // per_word
    E, N, K = values.shape
    if group_size and group_size % plane:
        raise ValueError(f"group size {group_size} is not a multiple of the kernel's plane of {plane} features")
    kp = cdiv(K, tile_k) * tile_k
    u = F.pad(values.to(torch.int64) + (1 << (bits - 1)), (0, kp - K), value=1 << (bits - 1))
    u = u.view(E, N, kp // tile_k, per_word, plane).transpose(-1, -2)  # [E, N, T, w, j]
    shifts = torch.arange(per_word, dtype=torch.int64, device=u.device) * bits
    words = (u << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).reshape(E, N, kp // per_word)
    scales = scale.float().transpose(1, 2).contiguous()
    zeros = None
    if zero_point is not None:
        zeros = (zero_point.to(torch.int32) + (1 << (bits - 1))).transpose(1, 2).contiguous()
    pw = PackedWeight(words.contiguous(), scales, zeros, bits, group_size, N, K, tile_k)
    return pair(pw) if paired else pw


def _unsigned(pw: PackedWeight) -> torch.Tensor:
    """The stored unsigned values (value + 2^(bits-1)), int64 [E, N, K]."""
    per_word = 32 // pw.bits
    plane = pw.tile_k // per_word
    E, N, words = pw.words.shape
    w = planar_words(pw).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * pw.bits
    u = (w.view(E, N, -1, plane)[..., None] >> shifts) & ((1 << pw.bits) - 1)  # [E, N, T, w, j]
    return u.transpose(-1, -2).reshape(E, N, -1)[..., :pw.k]


def values(pw: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of repack: (signed values int8 [E, N, K], scales [E, N, groups], zero points or None)."""
    half = 1 << (pw.bits - 1)
    zp = None if pw.zeros is None else (pw.zeros - half).transpose(1, 2)
    return (_unsigned(pw) - half).to(torch.int8), pw.scales.transpose(1, 2), zp


def slice_rows_cols(pw: PackedWeight, rows: slice, cols: slice) -> PackedWeight | None:
    """One expert's weight restricted to output rows and input columns [E, rows, cols], repacked; None where the
    columns do not start on a scale-group boundary."""
    g = pw.group_size
    start, stop = cols.start or 0, min(cols.stop if cols.stop is not None else pw.k, pw.k)
    if g and start % g:
        return None
    v, s, z = values(pw)
    gs = slice(start // g, cdiv(stop, g)) if g else slice(None)
    return repack(v[:, rows, start:stop], s[:, rows, gs], None if z is None else z[:, rows, gs], pw.bits, g,
                  pw.tile_k, pw.paired)


def cat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Weights of one configuration stacked along their output rows."""
    v, s, z = zip(*(values(p) for p in parts))
    first = parts[0]
    return repack(torch.cat(v, 1), torch.cat(s, 1), None if z[0] is None else torch.cat(z, 1), first.bits,
                  first.group_size, first.tile_k, first.paired)


def unpack(pw: PackedWeight) -> torch.Tensor:
    """The inverse of repack's value layout: float32 dequantized weights [E, N, K] (for the reference)."""
    E, N, _ = pw.words.shape
    u = _unsigned(pw)
    groups = pw.scales.shape[1]
    g = pw.group_size or pw.k
    zeros = pw.zeros if pw.zeros is not None else torch.full((E, groups, N), 1 << (pw.bits - 1),
                                                               device=u.device)
    expand = lambda t: t.transpose(1, 2).repeat_interleave(g, dim=2)[..., :pw.k].double()
    return ((u.double() - expand(zeros)) * expand(pw.scales)).float()
