"""GEMM over int4 / int8 weights packed in int32 words, dequantized in registers: w4a16, w8a16, w4a8, w4a8-int8.

The weights' layouts (tile-planar; paired for int4), `repack` and its inverse live in packed_layout.py. A tile of
words is read once, coalesced, and each shift gives a *contiguous* plane of input features: one matrix product per
plane, against contiguous activations, on the tensor cores in the activation's type (bf16; FP8 e4m3 for w4a8,
quantized on the fly from the static input scale, or per token with --dynamic; int8 for w4a8-int8; the per-token
scales come from one quantization pass before the GEMM). Scales (float32, [E, groups, N]) are applied to each plane's
product, so the weights themselves never leave small integers. The fused MoE's symmetric int4 experts take the paired
layout (`experts_layout`; LOWBIT_INT4_PAIRED=0 keeps them planar): on an H100 it took the one-token V2-Lite MoE
from 33.0 to 27.1 us (w4a16) and 41.7 to 36.4 us (w4a8), benchmarks/results/moe-configs-paired-*.

Grouped mode (MOE): the rows of a program come from `sorted_ids` (token-slot ids sorted by expert, padded per
expert to the block size, see moe.py), and its expert from `block_expert`; the same kernel then runs all experts of
a layer in one launch. FUSE_SILU computes gate (rows [0, N)) and up (rows [N, 2N)) of a merged gate_up weight and
writes silu(gate) * up.
"""
from __future__ import annotations

import os

import torch

from lowbit.kernels import act_quant, pdl
from lowbit.kernels.packed_layout import (  # noqa: F401 (the packed weights' API, used through this module)
    PackedWeight, cat_rows, default_tile_k, pair, planar_words, repack, slice_rows_cols, unpack, values)
from lowbit.kernels.rows import grid_and_rows, moe_mode, slot_sum_buffers, split_buffers

ACT_NONE, ACT_FP8_STATIC, ACT_INT8_TOKEN, ACT_FP8_TOKEN = 0, 1, 2, 3
# w4a8 at small M: x already on the static FP8 grid in 16 bits (act_quant.fp8_grid_rows, one launch for all N tiles
# instead of a quantization in each), the 16-bit path's exact products, the input scale applied at the end
ACT_FP8_GRID = 4
FP8_GRID_MAX_ROWS = 64  # rows up to which w4a8 takes ACT_FP8_GRID (beyond: FP8 tensor cores)
# and, in dense layers, only from this many weights: quantizing in every N tile cost about 15% of the GEMM (H100,
# 2026-11-23, R1 36864 x 7168 at M = 1: 97.9 vs 85.0 us, benchmarks/moe_configs.py), the grid's own launch about
# 2 us inside a CUDA graph, which a GEMM under about 60M int4 weights (under about 15 us) does not earn back
FP8_GRID_MIN_WEIGHTS = 60_000_000


# the fused MoE's int4 experts in the paired layout (see the module's docstring)
PAIRED_EXPERTS = os.environ.get("LOWBIT_INT4_PAIRED", "1") == "1"


def experts_layout(pw: PackedWeight, act: int) -> PackedWeight:
    """The layout the fused MoE's experts take (and dense layers off the GEMV: kernels/linear.py dense_layout): paired
    (unless LOWBIT_INT4_PAIRED=0) for symmetric int4 weights whose products run in 16 bits (sm_90a's main loop
    compiled no shorter for zero points or int8 activations)."""
    if PAIRED_EXPERTS and pw.bits == 4 and pw.zeros is None and act != ACT_INT8_TOKEN:
        return pair(pw)
    return pw


def packed_matmul_ref(x: torch.Tensor, pw: PackedWeight, act: int = ACT_NONE,
                      input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized weight [N, K]^T in float64 (expert 0), activations fake-quantized as `act` says."""
    xf = x.double()
    if act == ACT_FP8_STATIC:
        xf = act_quant.fp8_static_ref(x, input_scale).double() * input_scale.double().reshape(())
    elif act == ACT_INT8_TOKEN:
        q, s = act_quant.int8_per_token_ref(x)
        xf = q.double() * s.double()[:, None]
    elif act == ACT_FP8_TOKEN:
        q, s = act_quant.fp8_per_token_group_ref(x, x.shape[1])
        xf = q.double() * s.double()
    return xf @ unpack(pw)[0].double().t()


# ---------------------------------------------------------------------------------------------- kernel
try:
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter
except ImportError:
    triton = None

if triton is not None:
    from lowbit.kernels.rows import (gate_up_rows, one_token_expert, program_rows, silu_mul_pairs, store_rows,
                                     store_slot_sum, store_split)

    @triton.jit
    def _int4_to_16bit(u, z, dtype: tl.constexpr, HAS_ZP: tl.constexpr):
        """Unsigned nibbles u minus their zero point z, exactly, in bf16 or fp16, without I2F (a quarter-rate
        instruction that would bound the kernel): the nibble as the low mantissa bits of 128.0 (bf16 0x4300) or
        1024.0 (fp16 0x6400) is 128 + u or 1024 + u exactly, and subtracting 128 + z (or 1024 + z) is exact."""
        if dtype == tl.bfloat16:
            w = (u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            off = z + 128
        else:
            w = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            off = z + 1024
        if HAS_ZP:
            w = w - off.to(dtype)
        else:  # (one return: the compiler also visits the statements after a return inside a constexpr branch)
            w = w - tl.full([1, 1], off, dtype)  # a 16-bit constant: a Python number would promote w to fp32
        return w

    @triton.jit
    def _paired_tile(w_base, rows, mask, stride_wn, t, PLANE: tl.constexpr):
        """A K tile's paired-layout words of `rows`: its half of planes 0-3 and its half of planes 4-7, [rows, PLANE / 2]
        each."""
        p = tl.arange(0, PLANE // 2)
        ptrs = w_base + rows[:, None] * stride_wn + (t * PLANE + p)[None, :]
        return (tl.load(ptrs, mask=mask[:, None], other=0),
                tl.load(ptrs + PLANE // 2, mask=mask[:, None], other=0))

    @triton.jit
    def _paired_weights(wh, SH: tl.constexpr, zr, dtype: tl.constexpr, HAS_ZP: tl.constexpr, BN: tl.constexpr,
                        PLANE: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr):
        """One plane's weights from its half tile of paired-layout words wh [BN, PLANE / 2] (shifted by SH to the
        plane's nibbles) minus their zero points zr ([BN, 1] with HAS_ZP, else the constant 8): [BN, PLANE], or
        [PLANE, BN] where not SWAP. In bf16 / fp16 a word's two values (k, k + 1) come out as the 16-bit pair one
        operand register holds: the nibbles as the low mantissa bits of 128.0 (bf16) or 1024.0 (fp16) in one logic op,
        their zero point off in one packed FMA (ASM, symmetric weights: PTX on the GPU; otherwise the same arithmetic
        element-wise, which the compiler makes two logic ops a pair); exact. In any other dtype: int32 values."""
        v = wh >> SH
        if dtype == tl.bfloat16 or dtype == tl.float16:
            # (symmetric only: the zero points as a second operand made the compiler stage the result in shared
            # memory on its way to the tensor cores)
            if ASM and not HAS_ZP:
                if dtype == tl.bfloat16:  # 128 + u in each half, then (128 + u) * 1 - 136
                    pairs = tl.inline_asm_elementwise(
                        "{ .reg .b32 t, one, off; mov.b32 one, 0x3F803F80; mov.b32 off, 0xC308C308; "
                        "lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea; fma.rn.bf16x2 $0, t, one, off; }",
                        "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
                else:  # 1024 + u, then (1024 + u) * 1 - 1032
                    pairs = tl.inline_asm_elementwise(
                        "{ .reg .b32 t, one, off; mov.b32 one, 0x3C003C00; mov.b32 off, 0xE408E408; "
                        "lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea; fma.rn.f16x2 $0, t, one, off; }",
                        "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
                lo = pairs.to(tl.int16).to(dtype, bitcast=True)
                hi = (pairs >> 16).to(tl.int16).to(dtype, bitcast=True)
            else:
                if dtype == tl.bfloat16:
                    m = (v & 0x000F000F) | 0x43004300
                    off = (zr + 128).to(dtype) if HAS_ZP else tl.full([1, 1], 136, dtype)
                else:
                    m = (v & 0x000F000F) | 0x64006400
                    off = (zr + 1024).to(dtype) if HAS_ZP else tl.full([1, 1], 1032, dtype)
                lo = m.to(tl.int16).to(dtype, bitcast=True) - off
                hi = (m >> 16).to(tl.int16).to(dtype, bitcast=True) - off
        else:
            lo = (v & 15) - zr
            hi = ((v >> 16) & 15) - zr
        w = tl.reshape(tl.join(lo, hi), (BN, PLANE))
        if not SWAP:
            w = tl.trans(w)
        return w

    @triton.jit
    def _packed_acc(x_ptr, x_rows, row_mask, stride_xm, w_base, stride_wn, s_base, z_base, n_rows, n_mask,
                    K, num_groups, n_total, t_start, t_end, inv_in_scale,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ACT: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, TK: tl.constexpr, SWAP: tl.constexpr,
                    EVEN_K: tl.constexpr, PAIRED: tl.constexpr, ASM: tl.constexpr):
        """sum over K tiles [t_start, t_end) of x[x_rows] @ W[n_rows]^T, group scales applied, in float32: [BM, BN],
        or with SWAP its transpose [BN, BM], computed as W @ x^T so that the dequantized weights are the matrix
        product's first operand, which Hopper's warpgroup MMA takes from registers (the second one it reads from
        shared memory, where the weights would otherwise be stored again after dequantization)."""
        PW: tl.constexpr = 32 // BITS
        PLANE: tl.constexpr = TK // PW
        MASK: tl.constexpr = (1 << BITS) - 1
        HALF: tl.constexpr = 1 << (BITS - 1)
        PPG: tl.constexpr = GROUP // PLANE if GROUP > 0 else PW  # planes per scale group (repack: PLANE | GROUP)
        offs_w = tl.arange(0, PLANE)
        if SWAP:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        for t in range(t_start, t_end):
            if PAIRED:
                w_lo, w_hi = _paired_tile(w_base, n_rows, n_mask, stride_wn, t, PLANE)
            elif SWAP:  # [BN, PLANE]: each row's words of this tile are contiguous
                words = tl.load(w_base + n_rows[:, None] * stride_wn + (t * PLANE + offs_w)[None, :],
                                mask=n_mask[:, None], other=0)
            else:  # [PLANE, BN]
                words = tl.load(w_base + n_rows[None, :] * stride_wn + (t * PLANE + offs_w)[:, None],
                                mask=n_mask[None, :], other=0)
            for j in tl.static_range(PW):
                k0 = t * TK + j * PLANE
                cols = k0 + offs_w
                if EVEN_K:  # K a multiple of the tile: no column mask
                    xj = tl.load(x_ptr + x_rows[:, None] * stride_xm + cols[None, :], mask=row_mask[:, None],
                                 other=0.0)
                else:
                    xj = tl.load(x_ptr + x_rows[:, None] * stride_xm + cols[None, :],
                                 mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
                if PAIRED:  # the plane's half tile and its nibbles' shift there
                    if j < PW // 2:
                        wh = w_lo
                    else:
                        wh = w_hi
                    SH = BITS * (j % (PW // 2))
                else:
                    u = (words >> (j * BITS)) & MASK
                if GROUP > 0:
                    g = k0 // GROUP
                    if EVEN_K:  # every group of the tile exists
                        g_ok = n_mask
                    else:
                        # a tensor, not a scalar: Triton 3.9's interpreter rejects a scalar bool in a load mask
                        g_ok = (g + tl.zeros_like(n_rows)) < num_groups
                if HAS_ZP:  # zero point + 2^(bits-1), per output column
                    if GROUP > 0:
                        zv = tl.load(z_base + g * n_total + n_rows, mask=n_mask & g_ok, other=HALF)
                    else:
                        zv = tl.load(z_base + n_rows, mask=n_mask, other=HALF)
                    zr = zv[:, None]
                    if SWAP:
                        z = zr
                    else:
                        z = zv[None, :]
                else:
                    z = HALF
                    zr = HALF
                if ACT == 0 or ACT == 4:
                    if PAIRED:
                        wm = _paired_weights(wh, SH, zr, xj.dtype, HAS_ZP, BN, PLANE, SWAP, ASM).to(xj.dtype)
                    elif xj.dtype == tl.float32:
                        wm = (u - z).to(tl.float32)
                    elif BITS == 4:
                        wm = _int4_to_16bit(u, z, xj.dtype, HAS_ZP)
                    else:
                        wm = (u - z).to(xj.dtype)
                    xm = xj
                elif ACT == 2:
                    if PAIRED:
                        wm = _paired_weights(wh, SH, zr, tl.int32, HAS_ZP, BN, PLANE, SWAP, ASM).to(tl.int8)
                    else:
                        wm = (u - z).to(tl.int8)
                    xm = xj
                else:  # FP8 activations: static scale (quantized here) or per token (quantized before)
                    if ACT == 1:
                        xq = tl.clamp(xj.to(tl.float32) * inv_in_scale, -448.0, 448.0).to(tl.float8e4nv)
                    else:
                        xq = xj
                    if PAIRED:
                        wm = _paired_weights(wh, SH, zr, tl.float16, HAS_ZP, BN, PLANE, SWAP, ASM)
                    else:
                        wm = _int4_to_16bit(u, z, tl.float16, HAS_ZP)  # int4 values are exact in fp16 and in e4m3
                    if BM >= 64 and not SWAP:  # FP8 tensor cores (wgmma)
                        wm = wm.to(tl.float8e4nv)
                        xm = xq
                    else:
                        # small M runs on the 16-bit MMA anyway: the same exact products in fp16 (e4m3 values are
                        # fp16 numbers)
                        xm = xq.to(tl.float16)
                # the products of one scale group accumulate in one chain and the group's scale applies once at its
                # end (integer products chain in int32)
                if j % PPG == 0:
                    if ACT == 2:
                        d = tl.zeros(acc.shape, dtype=tl.int32)
                    else:
                        d = tl.zeros(acc.shape, dtype=tl.float32)
                if xm.dtype == tl.float32:
                    if SWAP:
                        d = tl.dot(wm, tl.trans(xm), d, input_precision="ieee")
                    else:
                        d = tl.dot(xm, wm, d, input_precision="ieee")
                elif SWAP:
                    d = tl.dot(wm, tl.trans(xm), d, out_dtype=d.dtype)
                else:
                    d = tl.dot(xm, wm, d, out_dtype=d.dtype)
                if j % PPG == PPG - 1:
                    if GROUP > 0:
                        s = tl.load(s_base + g * n_total + n_rows, mask=n_mask & g_ok, other=0.0)
                        if SWAP:
                            acc += d.to(tl.float32) * s[:, None]
                        else:
                            acc += d.to(tl.float32) * s[None, :]
                    else:
                        acc += d.to(tl.float32)
        if GROUP == 0:
            s = tl.load(s_base + n_rows, mask=n_mask, other=0.0)
            if SWAP:
                acc = acc * s[:, None]
            else:
                acc = acc * s[None, :]
        return acc

    @triton.jit
    def _packed_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, xs_ptr,
                              sorted_ptr, expert_ptr, npad_ptr, rw_ptr, ws_ptr, cnt_ptr,
                              M, N, K, num_groups, k_tiles, x_row_div,
                              stride_xm, stride_om, stride_we, stride_wn, stride_se,
                              BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ACT: tl.constexpr,
                              MOE: tl.constexpr, FUSE_SILU: tl.constexpr, ROUTED_WEIGHT: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr, TK: tl.constexpr, SPLIT_K: tl.constexpr,
                              SWAP: tl.constexpr, EVEN_K: tl.constexpr, FIXUP: tl.constexpr,
                              PAIRED: tl.constexpr = False, ASM: tl.constexpr = False,
                              og_ptr=None, SUM_SLOTS: tl.constexpr = False, OUT_GRID: tl.constexpr = False,
                              PDL: tl.constexpr = 0):
        enter(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if MOE == 1:
            if pid_m * BM >= tl.load(npad_ptr):
                return
        ids, row_mask, x_rows, e = program_rows(sorted_ptr, expert_ptr, pid_m, M, x_row_div, BM, MOE)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        if MOE == 2:
            e, n_mask = one_token_expert(e, offs_n, n_mask, SUM_SLOTS)
            if e < 0:  # another rank's expert: the caller zeroed its output row
                return
        n_total = 2 * N if FUSE_SILU else N
        tiles = k_tiles // SPLIT_K  # the host splits K evenly
        t_start = pid_k * tiles
        t_end = t_start + tiles
        inv_in_scale = 1.0
        if ACT == 1 or ACT == 4:  # static input scale, one per expert
            in_scale = tl.load(xs_ptr + e)
            inv_in_scale = 1.0 / in_scale
        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        z_base = z_ptr + e * stride_se
        if FUSE_SILU:  # gate row j and up row j (N + j) side by side: one loop, one pipeline for both
            w_rows, w_mask = gate_up_rows(pid_n, N, BN)
            acc = _packed_acc(x_ptr, x_rows, row_mask, stride_xm, w_base, stride_wn, s_base, z_base, w_rows, w_mask,
                              K, num_groups, n_total, t_start, t_end, inv_in_scale,
                              BITS, GROUP, HAS_ZP, ACT, BM, 2 * BN, TK, SWAP, EVEN_K, PAIRED, ASM)
        else:
            acc = _packed_acc(x_ptr, x_rows, row_mask, stride_xm, w_base, stride_wn, s_base, z_base, offs_n, n_mask,
                              K, num_groups, n_total, t_start, t_end, inv_in_scale,
                              BITS, GROUP, HAS_ZP, ACT, BM, BN, TK, SWAP, EVEN_K, PAIRED, ASM)
        if SWAP:
            acc = tl.trans(acc)
        if ACT == 1 or ACT == 4:
            acc = acc * in_scale
        elif ACT >= 2:  # per-token scales of the pre-quantized activations
            xs = tl.load(xs_ptr + x_rows, mask=row_mask, other=0.0)
            acc = acc * xs[:, None]
        if FUSE_SILU:
            acc = silu_mul_pairs(acc, BM, BN)
            if OUT_GRID:
                # the down projection's input on its expert's static FP8 grid, as act_quant.fp8_grid_rows would put the
                # stored row there (rounded to out's dtype first): that launch saved
                v = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
                acc = tl.clamp(tl.div_rn(v, tl.load(og_ptr + e)), -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
        if FIXUP:  # a dense product's K splits, added by the last of them (no zeroed float32 output)
            store_split(out_ptr, acc, ids, row_mask, offs_n, n_mask, stride_om, ws_ptr, cnt_ptr, M, N,
                        pid_m, pid_n, pid_k, SPLIT_K)
        elif SUM_SLOTS:
            store_slot_sum(out_ptr, acc, ids, row_mask, offs_n, n_mask, rw_ptr, ws_ptr, cnt_ptr, N, pid_m, pid_n,
                           pid_k, SPLIT_K)
        else:
            store_rows(out_ptr, acc, ids, row_mask, offs_n, n_mask, stride_om, rw_ptr, ROUTED_WEIGHT, SPLIT_K)


if triton is not None:
    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_we, stride_wn, stride_se, stride_oe, stride_on,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, BN: tl.constexpr,
                        TK: tl.constexpr, PAIRED: tl.constexpr = False, PDL: tl.constexpr = 0):
        """One K tile of BN rows of one expert: the packed words back to (value - zero) * scale in out's dtype."""
        enter(PDL)
        PW: tl.constexpr = 32 // BITS
        PLANE: tl.constexpr = TK // PW
        HALF: tl.constexpr = 1 << (BITS - 1)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        t = tl.program_id(1)
        e = tl.program_id(2).to(tl.int64)
        w_ptr += e * stride_we
        s_ptr += e * stride_se
        z_ptr += e * stride_se
        out_ptr += e * stride_oe
        r = tl.arange(0, PLANE)
        n_mask = n < N
        if PAIRED:
            w_lo, w_hi = _paired_tile(w_ptr, n, n_mask, stride_wn, t, PLANE)
        else:
            words = tl.load(w_ptr + n[:, None] * stride_wn + (t * PLANE + r)[None, :], mask=n_mask[:, None],
                            other=0)
        for j in tl.static_range(PW):
            cols = t * TK + j * PLANE + r
            g = (t * TK + j * PLANE) // GROUP if GROUP > 0 else 0
            s = tl.load(s_ptr + g * N + n, mask=n_mask, other=0.0)
            if HAS_ZP:
                z = tl.load(z_ptr + g * N + n, mask=n_mask, other=HALF)[:, None]
            else:
                z = HALF
            if PAIRED:
                if j < PW // 2:
                    wh = w_lo
                else:
                    wh = w_hi
                w = _paired_weights(wh, BITS * (j % (PW // 2)), z, tl.int32, HAS_ZP, BN, PLANE, True, False)
                w = w.to(tl.float32) * s[:, None]
            else:
                u = (words >> (j * BITS)) & ((1 << BITS) - 1)
                w = (u - z).to(tl.float32) * s[:, None]
            tl.store(out_ptr + n[:, None] * stride_on + cols[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & (cols[None, :] < K))


def dequantize(pw: PackedWeight, dtype: torch.dtype, expert: int | None = 0,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's weights [N, K] (expert=None: all of them, [E, N, K]) in `dtype`, for the matrix libraries and
    the 16-bit MoE kernel at large M (see PackedLinear, moe.fused_moe). input_scale (one, or one per expert): w4a8's
    static input scales multiplied into the weights, whose activations then stay on the FP8 grid unscaled (see
    activations_16bit)."""
    words, scales = pw.words, pw.scales
    zeros = pw.zeros if pw.zeros is not None else pw.scales
    if expert is not None:
        words, scales, zeros = words[expert:expert + 1], scales[expert:expert + 1], zeros[expert:expert + 1]
    if input_scale is not None:
        s = input_scale.float().reshape(-1)
        if expert is not None and s.numel() > 1:
            s = s[expert:expert + 1]
        scales = (scales * s.reshape(-1, 1, 1)).contiguous()
    E = words.shape[0]
    out = torch.empty(E, pw.n, pw.k, dtype=dtype, device=words.device)
    bn = 64
    k_tiles = words.shape[2] * (32 // pw.bits) // pw.tile_k
    if E:
        _dequant_kernel[(triton.cdiv(pw.n, bn), k_tiles, E)](
            words, scales, zeros, out, pw.n, pw.k, words.stride(0), words.stride(1), scales.stride(0),
            out.stride(0), out.stride(1),
            BITS=pw.bits, GROUP=pw.group_size, HAS_ZP=pw.zeros is not None, BN=bn, TK=pw.tile_k, PAIRED=pw.paired,
            num_warps=4, **pdl.launch(words.device))
    return out[0] if expert is not None else out


def launch(x: torch.Tensor, pw: PackedWeight, out: torch.Tensor, act: int, act_scale: torch.Tensor | None,
           config: dict, moe: tuple | None = None, fuse_silu: bool = False,
           routed_weights: torch.Tensor | None = None, x_row_div: int = 1, sum_slots: bool = False,
           out_grid: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel. moe = (sorted_ids, block_expert, num_padded [1], num_ids): grouped mode over
    experts; otherwise dense over x's M rows with expert 0. sum_slots (one token, moe = (None, slot_experts)):
    out [1, N] is the sum of the slots' routed-weighted rows (rows.store_slot_sum), their K split as config's
    SPLIT_K says (a grouped launch's K is otherwise whole). out_grid (float32 [E], with fuse_silu): each row written
    on the static FP8 grid of its expert's scale there, in out's dtype (the next projection's w4a8 input)."""
    bm, bn = config["BM"], config["BN"]
    split_k = config.get("SPLIT_K", 1) if moe is None or sum_slots else 1
    n = pw.n // 2 if fuse_silu else pw.n
    k_tiles = pw.words.shape[2] * (32 // pw.bits) // pw.tile_k
    assert k_tiles % split_k == 0, f"SPLIT_K={split_k} must divide the {k_tiles} K tiles"
    dummy = pw.scales
    grid, sorted_ids, block_expert, num_padded, m = grid_and_rows(moe, x.shape[0], n, bm, bn, split_k, dummy)
    # (a zeroed float32 output takes atomic adds instead; the slots' sum adds the splits itself)
    fixup = split_k > 1 and out.dtype != torch.float32 and not sum_slots
    assert not fixup or moe is None, "a grouped launch's K splits add into a zeroed float32 output"
    if sum_slots:
        ws, counters = slot_sum_buffers(moe, out, routed_weights, n, grid, fuse_silu, split_k)
    else:
        ws, counters = split_buffers(m, n, split_k, grid[0] * grid[1], x.device) if fixup else (dummy, dummy)
    _packed_matmul_kernel[grid](
        x, pw.words, pw.scales, pw.zeros if pw.zeros is not None else dummy, out,
        act_scale if act_scale is not None else dummy,
        sorted_ids, block_expert, num_padded, routed_weights if routed_weights is not None else dummy, ws, counters,
        m, n, pw.k, pw.scales.shape[1], k_tiles, x_row_div,
        x.stride(0), out.stride(0), pw.words.stride(0), pw.words.stride(1), pw.scales.stride(0),
        BITS=pw.bits, GROUP=pw.group_size, HAS_ZP=pw.zeros is not None, ACT=act,
        MOE=moe_mode(moe), FUSE_SILU=fuse_silu, ROUTED_WEIGHT=routed_weights is not None,
        BM=bm, BN=bn, TK=pw.tile_k, SPLIT_K=split_k, SWAP=config.get("SWAP", False),
        EVEN_K=pw.k % pw.tile_k == 0, FIXUP=fixup, PAIRED=pw.paired, ASM=x.is_cuda, SUM_SLOTS=sum_slots,
        **({"og_ptr": out_grid, "OUT_GRID": True} if out_grid is not None else {}),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3), **pdl.launch(x.device))
    return out


def dequantize_16bit(pw: PackedWeight, dtype: torch.dtype, act: int, input_scale: torch.Tensor | None,
                     expert: int | None = 0) -> torch.Tensor:
    """The weights a 16-bit product on activations_16bit's rows takes: dequantized, w4a8's static input scales in."""
    return dequantize(pw, dtype, expert, input_scale if act == ACT_FP8_STATIC else None)


def activations_16bit(x: torch.Tensor, act: int, input_scale: torch.Tensor | None = None,
                      row_experts: torch.Tensor | None = None, row_div: int = 1) -> tuple[torch.Tensor, int]:
    """x as the scheme's GEMM sees it, in x's 16-bit dtype, for a 16-bit matrix product on dequantized weights (the
    large-M path of every packed scheme): weight-only x itself; static FP8 (w4a8) the rows on the FP8 grid, exact
    and unscaled (the scales go into the weights: dequantize's input_scale), one row per slot of row_experts where
    the experts have scales of their own; per-token int8 / FP8 the quantized values times their token's scale,
    rounded once to x's dtype. Returns (rows, the row divisor that maps the product's rows to x's); the
    weights to go with them: dequantize_16bit."""
    if act == ACT_NONE:
        return x, row_div
    if act == ACT_FP8_STATIC:
        scales = input_scale.float().reshape(-1)
        if row_experts is None or scales.numel() == 1:
            return act_quant.fp8_grid_rows(x, scales[:1]), row_div
        return act_quant.fp8_grid_rows(x, scales, row_experts, row_div), 1
    q, s = quantize_input(x, act)
    return (q.float() * s.reshape(-1, 1)).to(x.dtype), row_div


def quantize_input(x: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-token pass of ACT_INT8_TOKEN and ACT_FP8_TOKEN (the others read x as it is)."""
    if act == ACT_INT8_TOKEN:
        return act_quant.int8_per_token(x)
    if act == ACT_FP8_TOKEN:
        q, s = act_quant.fp8_per_token_group(x, x.shape[1])
        return q, s.view(-1)
    return x, None


def packed_matmul(x: torch.Tensor, pw: PackedWeight, act: int = ACT_NONE, input_scale: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16) @ W^T for a one-expert PackedWeight -> [M, N] in x's dtype."""
    from lowbit.kernels import tuning
    assert x.dim() == 2 and x.shape[1] == pw.k and x.stride(1) == 1, f"x {tuple(x.shape)} vs K={pw.k}"
    assert pw.num_experts == 1, "dense packed_matmul takes one expert's weight"
    assert act != ACT_FP8_STATIC or input_scale is not None, "w4a8 needs its static input scale"
    from lowbit.kernels import gemv_packed
    if config.get("GEMV") if config else gemv_packed.takes(x.shape[0], pw.n, pw.k) and not pw.paired:
        # one row: the CUDA-core GEMV (gemv_packed.py), which reads each weight word once without padding the row
        config = config or tuning.gemv_config(pw.n, pw.k, pw.bits)
        xq, xs = gemv_packed.input_rows(x, act, input_scale)
        out = torch.empty(1, pw.n, dtype=x.dtype, device=x.device)
        return gemv_packed.launch(xq, pw, out, act, xs, config)
    config = config or tuning.packed_config(x.shape[0], pw.n, pw.k, pw.bits, act, paired=pw.paired)
    xq, xs = quantize_input(x, act)
    if act == ACT_FP8_STATIC:
        xs = input_scale.float().reshape(1)
        if x.shape[0] <= FP8_GRID_MAX_ROWS:
            if pw.n * pw.k >= FP8_GRID_MIN_WEIGHTS:
                xq, act = act_quant.fp8_grid_rows(x, xs), ACT_FP8_GRID
        else:
            # quantized once here rather than in every N tile of the GEMM: the per-token path with one scale
            xq = act_quant.fp8_static_ref(x, xs)
            xs = xs.expand(x.shape[0]).contiguous()
            act = ACT_FP8_TOKEN
    # (a float32 output takes the K splits' atomic adds: zeroed)
    out = (torch.zeros if x.dtype == torch.float32 else torch.empty)(x.shape[0], pw.n, dtype=x.dtype, device=x.device)
    return launch(xq, pw, out, act, xs, config)
