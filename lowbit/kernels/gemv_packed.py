"""One row against packed int4 / int8 weights on the CUDA cores: batch-1 decode's dense packed layers (and, with
LOWBIT_GEMV_MOE=1, the one-token fused MoE).

At one token the tensor-core GEMM of matmul_packed.py pads its one row to sixteen and spends its time on the
dequantization and the small products' latency (V2-Lite's w4a16 experts at one token: 36% of copy bandwidth, H100,
2026-11-23, moe-configs-h100-80gb-hbm3-2026-11-23.md). Here a program owns BN output rows (gate and up rows side by
side where SiLU is fused) over the whole K, or a K split of it for dense layers, and reads each weight word once.
Measured (H100, 2026-11-24, benchmarks/gemv.py and profile_decode.py): faster than the tensor-core kernel on dense
layers up to about 32M weights, not on the MoE's experts in the decode graph; it is bound by its instructions (about
5.5 a weight with the activation and address work, Nsight Compute: SM 60% busy, DRAM 30%), not by its loads.

A word of the tile-planar layout (packed_layout.repack) holds the same position w of per_word consecutive planes of
32 input features. A value is turned into a float32 without a conversion instruction: masked in place (shift 4i or
8i within the word's low or high 16 bits) and ORed into the mantissa of 2^23, it reads as 2^23 + u * 2^(4i);
subtracting 2^23 + z * 2^(4i) leaves (u - z) * 2^(4i) exactly, and the plane's activations come pre-scaled by
2^-(4i) (exact). So a weight's own cost is one logic op, one subtract and one fused multiply-add, all in float32:
the same products as the reference's, the sums in another order. A scale group's products add in a [BN, 32] partial that
takes the group's scale once; a program reduces its 32 lanes once, at the end.

Activations as matmul_packed's modes: 16-bit as they are (w4a16, w8a16; and ACT_FP8_GRID: already on the FP8 grid,
the static scale applied at the end), FP8 static quantized here per plane (w4a8: a 32-feature vector per plane and
program, where the tensor-core kernel would quantize a padded [16, 32] tile), per-token int8 / FP8 pre-quantized
with their token's scale applied at the end.

MoE (T = 1): program row = a token slot, its expert read from topk_ids directly (no sort by expert: one token's
slots name different experts), -1 (another rank's expert) skipped.
"""
from __future__ import annotations

import os

import torch

from lowbit.kernels import cdiv, pdl
from lowbit.kernels import matmul_packed as mp

try:
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter, prefetch
except ImportError:
    triton = None

# LOWBIT_GEMV=0 keeps one row on the tensor-core kernel (benchmarks compare the two)
ENABLED = os.environ.get("LOWBIT_GEMV", "1") != "0"
# the one-token fused MoE here (LOWBIT_GEMV_MOE=1) rather than on the tensor-core kernel: alone (benchmarks/gemv.py)
# it measured faster, but in V2-Lite's decode graph slower (H100, 2026-11-24, w4a16, four layers: gate_up 22.3 vs
# 20.4 us, down with the slots' sum 15.5 vs 11.2 + 2.1 for moe_sum), so off by default
MOE = os.environ.get("LOWBIT_GEMV_MOE", "0") == "1"
# dense layers of more weights than this keep the tensor-core kernel at one row: below it the GEMV measured faster
# on every shape (H100, 2026-11-24, benchmarks/gemv.py: V2-Lite's q / kv_a 8.1 -> 6.8 us, o_proj 6.4 -> 5.8, dense
# down 2048 x 10944 36.0 -> 13.1; R1's q_a / kv_a 2112 x 7168 12.0 -> 10.5), above it the tensor cores did at the
# GEMV's heuristic configuration (V2-Lite's dense gate_up 21888 x 2048 16.8 vs 20.4 us; R1's q_b 13.9 vs 18.3,
# o_proj 48.3 vs 59.3, dense gate_up 84.4 vs 108.2)
MAX_WEIGHTS = 32 << 20


def takes(m: int, n: int, k: int) -> bool:
    """Whether a dense packed product of m rows runs here."""
    return ENABLED and m == 1 and n * k <= MAX_WEIGHTS


if triton is not None:
    from lowbit.kernels.rows import add_parts, gate_up_rows

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, xs_ptr, slot_expert_ptr, rw_ptr, ws_ptr, cnt_ptr,
                     N, K, num_groups, k_tiles, x_row_div, n_ws,
                     stride_xm, stride_om, stride_we, stride_wn, stride_se,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ACT: tl.constexpr,
                     MOE: tl.constexpr, FUSE_SILU: tl.constexpr, ROUTED_WEIGHT: tl.constexpr,
                     SUM_SLOTS: tl.constexpr,
                     BN: tl.constexpr, TK: tl.constexpr, TILES: tl.constexpr, SPLIT_K: tl.constexpr,
                     EVEN_K: tl.constexpr, PDL: tl.constexpr):
        PW: tl.constexpr = 32 // BITS
        PLANE: tl.constexpr = TK // PW
        MASK: tl.constexpr = (1 << BITS) - 1
        HALF: tl.constexpr = 1 << (BITS - 1)
        PPG: tl.constexpr = GROUP // PLANE if GROUP > 0 else PW  # planes per scale group (repack: PLANE | GROUP)
        R: tl.constexpr = 2 * BN if FUSE_SILU else BN
        slot = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        e_raw = 0
        if MOE:
            enter(PDL)  # (the expert is the router's)
            e = tl.load(slot_expert_ptr + slot)
            e_raw = e
            if SUM_SLOTS:  # another rank's expert adds zeros (its program still counts for the sum below)
                e = tl.maximum(e, 0)
            elif e < 0:  # another rank's expert: the caller zeroed its output row
                return
            e = e.to(tl.int64)
        else:
            e = 0
        x_row = (slot // x_row_div).to(tl.int64)
        x_base = x_ptr + x_row * stride_xm
        if FUSE_SILU:
            rows, n_mask = gate_up_rows(pid_n, N, BN)
            n_total = 2 * N
        else:
            rows = pid_n * BN + tl.arange(0, BN)
            n_mask = rows < N
            n_total = N
        if SUM_SLOTS:
            # (a skipped expert's weights are never read; the test as a tensor: see matmul_packed's g_ok)
            n_mask = n_mask & ((tl.zeros_like(rows) + e_raw) >= 0)
        in_scale = 1.0
        if ACT == 1 or ACT == 4:  # static input scale, one per expert
            in_scale = tl.load(xs_ptr + e)
        inv_in_scale = 1.0 / in_scale
        s_base = s_ptr + e * stride_se
        z_base = z_ptr + e * stride_se
        offs_w = tl.arange(0, PLANE)
        w_ptrs = w_ptr + e * stride_we + rows[:, None] * stride_wn + offs_w[None, :]
        t_start = pid_k * TILES
        t_end = tl.minimum(t_start + TILES, k_tiles)  # (the last split may be short)
        acc = tl.zeros([R, PLANE], dtype=tl.float32)
        nxt = tl.load(w_ptrs + t_start * PLANE, mask=n_mask[:, None], other=0)
        if not MOE:
            # a dense layer's first tile is read, and its next one asked of L2, while the kernel before finishes
            LINES: tl.constexpr = PLANE // 32 if PLANE > 32 else 1
            second = w_ptr + tl.where(n_mask, rows, 0) * stride_wn + tl.minimum(t_start + 1, t_end - 1) * PLANE
            prefetch(second[:, None] + (tl.arange(0, LINES) * 32)[None, :], PDL)
            enter(PDL)
        for t in range(t_start, t_end):
            words = nxt
            # the next tile's words are on their way while this one is computed (the last one is loaded twice;
            # more tiles ahead measured no faster on an H100, 2026-11-24: the kernel is bound by its instructions)
            nxt = tl.load(w_ptrs + tl.minimum(t + 1, t_end - 1) * PLANE, mask=n_mask[:, None], other=0)
            high = words >> 16  # (the mask below drops the sign's copies)
            for j in tl.static_range(PW):
                SH = BITS * (j % (PW // 2))  # (constexpr: j is)
                k0 = t * TK + j * PLANE
                if EVEN_K:
                    xj = tl.load(x_base + k0 + offs_w)
                else:
                    xj = tl.load(x_base + k0 + offs_w, mask=k0 + offs_w < K, other=0.0)
                xj = xj.to(tl.float32)
                if ACT == 1:  # onto the FP8 grid of the static scale, unscaled (the scale applies at the end)
                    xj = tl.clamp(xj * inv_in_scale, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
                xj = xj * (1.0 / (1 << SH))
                if j < PW // 2:
                    half = words
                else:
                    half = high
                f = ((half & (MASK << SH)) | 0x4B000000).to(tl.float32, bitcast=True)
                if GROUP > 0:
                    g = k0 // GROUP
                    g_ok = n_mask
                    if not EVEN_K:  # (a tensor, not a scalar: see matmul_packed's g_ok)
                        g_ok = g_ok & ((g + tl.zeros_like(rows)) < num_groups)
                    sz = g * n_total + rows
                if HAS_ZP:  # zero point + 2^(bits-1), per output row
                    if GROUP > 0:
                        zv = tl.load(z_base + sz, mask=g_ok, other=HALF)
                    else:
                        zv = tl.load(z_base + rows, mask=n_mask, other=HALF)
                    wv = f - (8388608.0 + zv.to(tl.float32) * (1 << SH))[:, None]
                else:
                    wv = f - (8388608.0 + HALF * (1 << SH))
                if j % PPG == 0:
                    d = tl.zeros([R, PLANE], dtype=tl.float32)
                d += wv * xj[None, :]
                if j % PPG == PPG - 1:
                    if GROUP > 0:
                        acc += d * tl.load(s_base + sz, mask=g_ok, other=0.0)[:, None]
                    else:
                        acc += d
        out = tl.sum(acc, axis=1)
        if SPLIT_K > 1:
            # K split over programs (a tile or two each: one load's latency, not a chain of them); the last split of
            # a row block adds them and finishes the rows below
            num_rows = tl.num_programs(0)
            out, last = add_parts(ws_ptr + slot * n_ws + pid_n * R + tl.arange(0, R), out, tl.full([R], 1, tl.int1),
                                  pid_k, SPLIT_K, num_rows * n_ws, cnt_ptr, slot * tl.num_programs(1) + pid_n)
        if GROUP == 0:
            out = out * tl.load(s_base + rows, mask=n_mask, other=0.0)
        if ACT == 1 or ACT == 4:
            out = out * in_scale
        elif ACT >= 2:  # per-token scales of the pre-quantized activations
            out = out * tl.load(xs_ptr + x_row)
        if FUSE_SILU:
            gate, up = tl.split(tl.reshape(out, (BN, 2)))
            out = gate / (1.0 + tl.exp(-gate)) * up
            cols = pid_n * BN + tl.arange(0, BN)
        else:
            cols = rows
        if ROUTED_WEIGHT:
            out = out * tl.load(rw_ptr + slot)
        store_mask = cols < N
        if SPLIT_K > 1:
            store_mask = store_mask & last
        if SUM_SLOTS:
            # the token's slots summed here rather than by moe_sum's launch: the last slot of a column block adds
            # them and writes the token's row (a skipped slot's input row was never written: its part is zero)
            out = tl.where((tl.zeros_like(cols) + e_raw) >= 0, out, 0.0)
            out, last = add_parts(ws_ptr + pid_n * BN + tl.arange(0, BN), out, tl.full([BN], 1, tl.int1), slot,
                                  tl.num_programs(0), n_ws, cnt_ptr, pid_n)
            tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=store_mask & last)
        else:
            tl.store(out_ptr + slot * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=store_mask)


def launch(x: torch.Tensor, pw: mp.PackedWeight, out: torch.Tensor, act: int, act_scale: torch.Tensor | None,
           config: dict, slot_experts: torch.Tensor | None = None, fuse_silu: bool = False,
           routed_weights: torch.Tensor | None = None, x_row_div: int = 1, sum_slots: bool = False) -> torch.Tensor:
    """Dense (slot_experts None): x [1, K] -> out [1, N] with expert 0. MoE: slot_experts [S] (expert of each
    output row, -1 skipped), out [S, N] row s from x row s // x_row_div; sum_slots: out [1, N], the sum of the S
    rows (one token's weighted expert outputs)."""
    from lowbit.kernels.rows import split_buffers
    assert not pw.paired, "the GEMV reads the tile-planar layout"
    bn = config["BN"]
    n = pw.n // 2 if fuse_silu else pw.n
    k_tiles = pw.words.shape[2] * (32 // pw.bits) // pw.tile_k
    tiles = min(config.get("TILES", k_tiles), k_tiles)
    split_k = cdiv(k_tiles, tiles)
    assert x.stride(-1) == 1 and out.stride(-1) == 1
    rows = 1 if slot_experts is None else slot_experts.numel()
    assert slot_experts is not None or x.shape[0] == 1, "the dense GEMV takes one row"
    grid = (rows, cdiv(n, bn), split_k)
    dummy = pw.scales
    # the partial sums of a split: [split_k, rows, the program's R outputs * programs along N]
    r_total = (2 * bn if fuse_silu else bn) * grid[1]
    assert not sum_slots or (slot_experts is not None and split_k == 1 and not fuse_silu)
    if split_k > 1 or sum_slots:
        ws, counters = split_buffers(rows, r_total, split_k, rows * grid[1], x.device)
    else:
        ws, counters = dummy, dummy
    _gemv_kernel[grid](
        x, pw.words, pw.scales, pw.zeros if pw.zeros is not None else dummy, out,
        act_scale if act_scale is not None else dummy, slot_experts if slot_experts is not None else dummy,
        routed_weights if routed_weights is not None else dummy, ws, counters,
        n, pw.k, pw.scales.shape[1], k_tiles, x_row_div, r_total,
        x.stride(0), out.stride(0), pw.words.stride(0), pw.words.stride(1), pw.scales.stride(0),
        BITS=pw.bits, GROUP=pw.group_size, HAS_ZP=pw.zeros is not None, ACT=act,
        MOE=slot_experts is not None, FUSE_SILU=fuse_silu, ROUTED_WEIGHT=routed_weights is not None,
        SUM_SLOTS=sum_slots,
        BN=bn, TK=pw.tile_k, TILES=tiles, SPLIT_K=split_k, EVEN_K=pw.k % pw.tile_k == 0,
        num_warps=config.get("num_warps", 4), num_stages=1, **pdl.launch(x.device))
    return out


def input_rows(x: torch.Tensor, act: int, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the rows the kernel reads, their scales) for x and a packed scheme's activations: static FP8 quantizes in the
    kernel (its scale per expert), per-token schemes are quantized here."""
    if act == mp.ACT_FP8_STATIC:
        return x, input_scale.float().reshape(-1)
    return mp.quantize_input(x, act)
