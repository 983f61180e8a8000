"""GEMM over one-byte-or-wider weights stored as they are: bf16 (the MoE's unquantized experts), int8 per channel
with int8 per-token activations (w8a8: int8 tensor cores, int32 accumulation), int8 per channel with 16-bit
activations (w8a16's experts: each int8 tile turned into the activations' dtype, exactly, for the 16-bit tensor
cores; the channel's scale applied at the end), and FP8 e4m3 with 128x128 block scales and per-token-group FP8
activations (fp8-block, DeepSeek's `fp8_gemm`: one FP8 product per 128 input features, scaled by the activation
group's and the weight block's scales).

w8a8 with int8 activations per token and 32 features (--act-group-size 32, KIND_INT8_G32) runs as w8a16's int8
weights (KIND_INT8_W16) on its activations put on their groups' int8 grids in 16 bits first (activations_16bit: the
codes times their group's scale, rounded once to the model's dtype, as the torch reference path's fake
quantization rounds them too). An int8 tensor-core product scaled per 32-feature slice ran at 0.5-0.6x w8a8 per
token's time at one to 64 rows and 0.3x bf16's rate at 4096 on an H100 (2026-11-25, commits 3a26e27 and 7ff82d4,
w8a8-groups-h100-80gb-hbm3-2026-11-25-bk32.md and -imma.md), where decode is bound by the int8 weights' bytes, which
w8a16's kernel reads at the same rate.

Weights are [E, N, K], K contiguous (the operand order FP8 and int8 tensor cores want); dense layers use E = 1.
The grouped (MOE) and FUSE_SILU modes are those of matmul_packed.
"""
from __future__ import annotations

import torch

from lowbit.kernels import act_quant, cdiv, pdl
from lowbit.kernels.rows import grid_and_rows, moe_mode, slot_sum_buffers, split_buffers

KIND_BF16, KIND_INT8_CHANNEL, KIND_FP8_BLOCK, KIND_INT8_W16, KIND_INT8_G32 = 0, 1, 2, 3, 4
CHANNEL_SCALED = (KIND_INT8_CHANNEL, KIND_INT8_W16, KIND_INT8_G32)  # int8 weights, one float32 scale a channel
FP8_BLOCK = 128
ACT_GROUP = 32  # KIND_INT8_G32's activation group
GROUP_M = 8  # row tiles the persistent kernel walks together (their weight tiles shared in L2)


def unpacked_matmul_ref(x: torch.Tensor, w: torch.Tensor, kind: int, w_scale: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """x [M, K] (float) @ the dequantized w [N, K]^T in float64, activations fake-quantized as the kind says."""
    if kind == KIND_BF16:
        return x.double() @ w.double().t()
    N, K = w.shape
    if kind == KIND_INT8_W16:
        return x.double() @ (w.double() * w_scale.double().reshape(N, 1)).t()
    if kind == KIND_INT8_CHANNEL:
        q, s = act_quant.int8_per_token_ref(x)
        return (q.double() * s.double()[:, None]) @ (w.double() * w_scale.double().reshape(N, 1)).t()
    if kind == KIND_INT8_G32:
        q, s = act_quant.int8_per_token_group_ref(x, ACT_GROUP)
        xd = q.double() * s.double().repeat_interleave(ACT_GROUP, 1)[:, :K]
        return xd @ (w.double() * w_scale.double().reshape(N, 1)).t()
    q, s = act_quant.fp8_per_token_group_ref(x, FP8_BLOCK)
    xd = q.double() * s.double().repeat_interleave(FP8_BLOCK, 1)[:, :K]
    wd = w.double() * w_scale.double().repeat_interleave(FP8_BLOCK, 0)[:N].repeat_interleave(FP8_BLOCK, 1)[:, :K]
    return xd @ wd.t()


try:
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter
except ImportError:
    triton = None

if triton is not None:
    from lowbit.kernels.act_quant import absmax_scale, int8_codes
    from lowbit.kernels.rows import (gate_up_rows, one_token_expert, program_rows, silu_mul_pairs, store_rows,
                                     store_slot_sum, store_split)

    @triton.jit
    def _unpacked_acc(x_ptr, x_rows, row_mask, stride_xm, xs_ptr, w_base, stride_wn, ws_base, stride_wsn,
                      n_rows, n_mask, K, k_groups, t_start, t_end,
                      KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      QUANT_IN: tl.constexpr = False, in_scale=1.0, x_row=0):
        """QUANT_IN (int8): x's one row x_row of this program in 16 bits, quantized here with its scale in_scale (a
        K tile's codes made once, as a vector, and put in the tile's row of the program's one real row: the
        whole tile's took 2-4x the product's time, H100, 2026-11-25)."""
        offs_k = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc_i = tl.zeros([BM, BN], dtype=tl.int32)
        for t in range(t_start, t_end):
            cols = t * BK + offs_k
            if QUANT_IN:
                v = tl.load(x_ptr + x_row * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
                a = tl.where(row_mask[:, None], int8_codes(v, in_scale)[None, :], 0).to(tl.int8)
            else:
                a = tl.load(x_ptr + x_rows[:, None] * stride_xm + cols[None, :],
                            mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
            b = tl.load(w_base + n_rows[:, None] * stride_wn + cols[None, :],
                        mask=n_mask[:, None] & (cols[None, :] < K), other=0.0)
            if KIND == 0 or KIND == 3:
                if KIND == 3:  # int8 values are exact in 16 bits (and in float32)
                    b = b.to(a.dtype)
                if a.dtype == tl.float32:  # float32 models stay float32 (Triton's default would be tf32)
                    acc += tl.dot(a, tl.trans(b), input_precision="ieee")
                else:
                    acc += tl.dot(a, tl.trans(b))
            elif KIND == 1:
                acc_i += tl.dot(a, tl.trans(b))
            else:
                xs = tl.load(xs_ptr + x_rows * k_groups + t, mask=row_mask, other=0.0)
                ws = tl.load(ws_base + (n_rows // 128) * stride_wsn + t, mask=n_mask, other=0.0)
                # each block's product scaled as it lands: Triton waits for the MMA here (wgmma.wait_group 0 after
                # every K step, so the tensor cores idle while it scales; 641-667 TFLOP/s at M = 4096 on an H100).
                # Scaling the previous block's product while this one's runs (tried 2026-11-24) compiled to the same
                # wait and a second accumulator: 386 TFLOP/s
                acc += tl.dot(a, tl.trans(b)) * xs[:, None] * ws[None, :]
        if KIND == 1:
            if QUANT_IN:
                xs = tl.zeros([BM], dtype=tl.float32) + in_scale
            else:
                xs = tl.load(xs_ptr + x_rows, mask=row_mask, other=0.0)
            ws = tl.load(ws_base + n_rows, mask=n_mask, other=0.0)
            acc = acc_i.to(tl.float32) * xs[:, None] * ws[None, :]
        elif KIND == 3:
            acc = acc * tl.load(ws_base + n_rows, mask=n_mask, other=0.0)[None, :]
        return acc

    @triton.jit
    def _unpacked_matmul_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
                                sorted_ptr, expert_ptr, npad_ptr, rw_ptr, part_ptr, cnt_ptr,
                                M, N, K, k_tiles, k_groups, x_row_div,
                                stride_xm, stride_om, stride_we, stride_wn, stride_wse, stride_wsn,
                                KIND: tl.constexpr, MOE: tl.constexpr, FUSE_SILU: tl.constexpr,
                                ROUTED_WEIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                BK: tl.constexpr, SPLIT_K: tl.constexpr, FIXUP: tl.constexpr,
                                SUM_SLOTS: tl.constexpr = False, QUANT_IN: tl.constexpr = False,
                                KP: tl.constexpr = 16, PDL: tl.constexpr = 0):
        """QUANT_IN (int8, one row a program: M = 1 or one token's slots): x is that row in 16 bits, K <= KP, its
        per-token int8 scale taken from the whole row read at once, its codes made in the K loop: what
        act_quant.int8_per_token's launch would give, without the launch."""
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
        in_scale = 1.0
        xr = 0
        if QUANT_IN:
            kk = tl.arange(0, KP)
            xr = tl.max(tl.where(row_mask, x_rows, 0), axis=0)  # (the program's one row)
            v = tl.load(x_ptr + xr * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
            in_scale = absmax_scale(v, 127.0)
        tiles = tl.cdiv(k_tiles, SPLIT_K)  # the last split may have fewer K tiles (V2-Lite's 1408 = 11 x 128)
        t_start = pid_k * tiles
        t_end = tl.minimum(t_start + tiles, k_tiles)
        w_base = w_ptr + e * stride_we
        ws_base = ws_ptr + e * stride_wse
        if FUSE_SILU:  # gate row j and up row j (N + j) side by side: one loop, one pipeline for both
            w_rows, w_mask = gate_up_rows(pid_n, N, BN)
            acc = _unpacked_acc(x_ptr, x_rows, row_mask, stride_xm, xs_ptr, w_base, stride_wn, ws_base, stride_wsn,
                                w_rows, w_mask, K, k_groups, t_start, t_end, KIND, BM, 2 * BN, BK, QUANT_IN,
                                in_scale, xr)
            acc = silu_mul_pairs(acc, BM, BN)
        else:
            acc = _unpacked_acc(x_ptr, x_rows, row_mask, stride_xm, xs_ptr, w_base, stride_wn, ws_base, stride_wsn,
                                offs_n, n_mask, K, k_groups, t_start, t_end, KIND, BM, BN, BK, QUANT_IN, in_scale,
                                xr)
        if FIXUP:  # a dense product's K splits, added by the last of them (no zeroed float32 output)
            store_split(out_ptr, acc, ids, row_mask, offs_n, n_mask, stride_om, part_ptr, cnt_ptr, M, N,
                        pid_m, pid_n, pid_k, SPLIT_K)
        elif SUM_SLOTS:
            store_slot_sum(out_ptr, acc, ids, row_mask, offs_n, n_mask, rw_ptr, part_ptr, cnt_ptr, N, pid_m, pid_n,
                           pid_k, SPLIT_K)
        else:
            store_rows(out_ptr, acc, ids, row_mask, offs_n, n_mask, stride_om, rw_ptr, ROUTED_WEIGHT, SPLIT_K)

    @triton.jit
    def _persistent_matmul_kernel(a_desc, b_desc, xs_ptr, ws_ptr, out_ptr, M, N, K, k_groups, stride_om, stride_wsn,
                                  KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                  GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, PDL: tl.constexpr):
        """A dense product of many rows (prefill), int8 (KIND 1) or fp8-block (KIND 2): one program per
        multiprocessor walking the output tiles GROUP_M row tiles at a time (their weight tiles shared in L2), the
        operands brought in by the tensor memory accelerator (descriptors: no address arithmetic in the loop, zeros
        past the edges). H100, 2026-11-24, fp8-block on R1's shapes at M = 4096: 701-824 TFLOP/s against 536-585 for
        _unpacked_matmul_kernel's 128 x 128 tiles (benchmarks/results/kernels-h100-80gb-hbm3-2026-11-24*.md)."""
        enter(PDL)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        width = GROUP_M * num_pid_n
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, PROGRAMS, flatten=False):
            first_m = (tile // width) * GROUP_M
            group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
            pid_m = first_m + (tile % width) % group_rows
            pid_n = (tile % width) // group_rows
            rows = pid_m * BM + tl.arange(0, BM)
            cols = pid_n * BN + tl.arange(0, BN)
            row_mask = rows < M
            col_mask = cols < N
            if KIND == 1:
                acc_i = tl.zeros([BM, BN], dtype=tl.int32)
                for t in range(k_tiles):
                    acc_i = tl.dot(a_desc.load([pid_m * BM, t * BK]), b_desc.load([pid_n * BN, t * BK]).T, acc_i,
                                   out_dtype=tl.int32)
                xs = tl.load(xs_ptr + rows, mask=row_mask, other=0.0)
                ws = tl.load(ws_ptr + cols, mask=col_mask, other=0.0)
                acc = acc_i.to(tl.float32) * xs[:, None] * ws[None, :]
            else:  # one 128-feature block a step, its product scaled as in _unpacked_acc (BN divides 128)
                acc = tl.zeros([BM, BN], dtype=tl.float32)
                for t in range(k_tiles):
                    xs = tl.load(xs_ptr + rows * k_groups + t, mask=row_mask, other=0.0)
                    ws = tl.load(ws_ptr + (pid_n * BN // 128) * stride_wsn + t)
                    acc += tl.dot(a_desc.load([pid_m * BM, t * BK]), b_desc.load([pid_n * BN, t * BK]).T) * \
                        (xs[:, None] * ws)
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])


if triton is not None:
    @triton.jit
    def _dequant_int8_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_we, stride_se, stride_oe, BN: tl.constexpr,
                             BK: tl.constexpr, PDL: tl.constexpr):
        """BN rows x BK columns of one expert: int8 value * its channel's float32 scale, rounded once."""
        enter(PDL)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        e = tl.program_id(2).to(tl.int64)
        mask = (n[:, None] < N) & (k[None, :] < K)
        offs = n[:, None].to(tl.int64) * K + k[None, :]
        v = tl.load(w_ptr + e * stride_we + offs, mask=mask, other=0).to(tl.float32)
        sc = tl.load(s_ptr + e * stride_se + n, mask=n < N, other=0.0)
        tl.store(out_ptr + e * stride_oe + offs, (v * sc[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 per-channel weights w [E, N, K] (K contiguous) with scales [E, N] (or [E, N, 1]) -> [E, N, K] in dtype,
    each value times its scale in float32, rounded once: w8a16's 16-bit weights for the matrix library and the
    16-bit MoE kernel at prefill, in one launch and without a float32 copy."""
    E, N, K = w.shape
    w = w.contiguous()
    scale = scale.reshape(E, N).float().contiguous()
    out = torch.empty(E, N, K, dtype=dtype, device=w.device)
    if out.numel():
        bn, bk = 32, 256
        _dequant_int8_kernel[(cdiv(N, bn), cdiv(K, bk), E)](w, scale, out, N, K, w.stride(0), scale.stride(0),
                                                           out.stride(0), BN=bn, BK=bk, num_warps=4,
                                                           **pdl.launch(w.device))
    return out


def quantize_input(x: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == KIND_INT8_CHANNEL:
        return act_quant.int8_per_token(x)
    if kind == KIND_FP8_BLOCK:
        return act_quant.fp8_per_token_group(x, FP8_BLOCK)
    return activations_16bit(x, kind), None


def activations_16bit(x: torch.Tensor, kind: int) -> torch.Tensor:
    """x as a 16-bit product sees it: KIND_INT8_G32's on their groups' int8 grids (the codes times their scale,
    rounded once to x's dtype); the weight-only kinds x itself."""
    if kind == KIND_INT8_G32:
        return act_quant.int8_per_token_group(x.contiguous(), ACT_GROUP, dequant=True)[0]
    assert kind in (KIND_BF16, KIND_INT8_W16), f"kind {kind} has no 16-bit activations"
    return x


def kernel_kind(kind: int) -> int:
    """The kernel's KIND for a kind: KIND_INT8_G32 runs KIND_INT8_W16's product on activations_16bit's rows."""
    return KIND_INT8_W16 if kind == KIND_INT8_G32 else kind


# one-row int8 products whose K is at most this quantize their row themselves (QUANT_IN: the row read at once, in
# registers; R1's o_proj, K = 16384, keeps the launch)
QUANT_IN_MAX_K = 4096


def kernel_input(x: torch.Tensor, kind: int, one_row: bool) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """-> (the rows the kernel reads, their scales, QUANT_IN): an int8 product whose programs each own one row
    (one_row: M = 1, or one token's slots) of K <= QUANT_IN_MAX_K takes the 16-bit row and quantizes it itself,
    one launch fewer at batch-1 decode, unless the row comes quantized already (the norm before it did it:
    act_quant.attach_int8_rows)."""
    if (kind == KIND_INT8_CHANNEL and one_row and x.shape[1] <= QUANT_IN_MAX_K
            and act_quant.attached_int8_rows(x) is None):
        return x, None, True
    return (*quantize_input(x, kind), False)


SMEM_STAGES_BUDGET = 200 << 10  # bytes of pipelined tiles `launch` keeps under Hopper's 227 KB a block


def pipeline_stages(stages: int, bm: int, bn: int, bk: int, x_bytes: int, w_bytes: int, fuse_silu: bool) -> int:
    """A configuration's pipeline stages within SMEM_STAGES_BUDGET (at least two): what tuning sized for 16-bit or
    8-bit tiles, fewer where the tiles are float32 (the float32 runs the GPU tests compare against the CPU's; the
    fused MoE's 32-row bf16 blocks at four stages needed 240 KB in float32, H100, 2026-11-25)."""
    tile = bm * bk * x_bytes + (2 if fuse_silu else 1) * bn * bk * w_bytes
    while stages > 2 and stages * tile > SMEM_STAGES_BUDGET:
        stages -= 1
    return stages


def launch(x: torch.Tensor, xs: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
           out: torch.Tensor, kind: int, config: dict, moe: tuple | None = None, fuse_silu: bool = False,
           routed_weights: torch.Tensor | None = None, x_row_div: int = 1, sum_slots: bool = False,
           quant_in: bool = False) -> torch.Tensor:
    """Run the kernel on already-quantized activations x (+ scales xs), or (quant_in: kernel_input's) on 16-bit
    rows it quantizes itself. w [E, N, K]; w_scale [E, N] (int8) or [E, N/128, K/128] (fp8-block); moe and
    sum_slots as in matmul_packed.launch."""
    kind = kernel_kind(kind)
    E, n_w, K = w.shape
    n = n_w // 2 if fuse_silu else n_w
    bm, bn, bk = config["BM"], config["BN"], config["BK"]
    if kind == KIND_FP8_BLOCK:
        assert bk == FP8_BLOCK, "fp8-block takes one K tile per 128-feature block"
    split_k = config.get("SPLIT_K", 1) if not fuse_silu else 1  # SiLU needs the whole sum
    k_tiles = cdiv(K, bk)
    assert split_k <= k_tiles, f"SPLIT_K={split_k}: at most the {k_tiles} K tiles"
    dummy = out
    if w_scale is None:
        w_scale = torch.empty(E, 1, 1, device=w.device)
    ws3 = w_scale.view(E, w_scale.shape[1], -1)
    if quant_in:
        assert kind == KIND_INT8_CHANNEL and xs is None and K <= QUANT_IN_MAX_K
        assert (moe is not None and moe[0] is None) or (moe is None and x.shape[0] == 1), "one row a program"
    grid, sorted_ids, block_expert, num_padded, m = grid_and_rows(moe, x.shape[0], n, bm, bn, split_k, dummy)
    # (a zeroed float32 output takes atomic adds instead; the slots' sum adds the splits itself)
    fixup = split_k > 1 and out.dtype != torch.float32 and not sum_slots
    assert not fixup or moe is None, "a grouped launch's K splits add into a zeroed float32 output"
    if sum_slots:
        part, counters = slot_sum_buffers(moe, out, routed_weights, n, grid, fuse_silu, split_k)
    else:
        part, counters = split_buffers(m, n, split_k, grid[0] * grid[1], x.device) if fixup else (dummy, dummy)
    stages = pipeline_stages(config.get("num_stages", 3), bm, bn, bk, x.element_size(), w.element_size(), fuse_silu)
    _unpacked_matmul_kernel[grid](
        x, xs if xs is not None else dummy, w, ws3, out,
        sorted_ids, block_expert, num_padded, routed_weights if routed_weights is not None else dummy, part, counters,
        m, n, K, k_tiles, cdiv(K, FP8_BLOCK), x_row_div,
        x.stride(0), out.stride(0), w.stride(0), w.stride(1), ws3.stride(0), ws3.stride(1),
        KIND=kind, MOE=moe_mode(moe), FUSE_SILU=fuse_silu, ROUTED_WEIGHT=routed_weights is not None,
        BM=bm, BN=bn, BK=bk, SPLIT_K=split_k, FIXUP=fixup, SUM_SLOTS=sum_slots, QUANT_IN=quant_in,
        KP=triton.next_power_of_2(K) if quant_in else 16,
        num_warps=config.get("num_warps", 4), num_stages=stages, **pdl.launch(x.device))
    return out


def persistent_ok(k: int, kind: int) -> bool:
    """Whether _persistent_matmul_kernel takes this layer: int8 or fp8-block, rows of a multiple of 16 bytes (the
    tensor memory accelerator's stride alignment)."""
    return kind in (KIND_INT8_CHANNEL, KIND_FP8_BLOCK) and k % 16 == 0


def launch_persistent(x: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor,
                      kind: int, config: dict) -> torch.Tensor:
    """_persistent_matmul_kernel on quantized activations x [M, K] (+ scales xs) and one dense layer's w [N, K]
    with its scales ([N, 1] int8, [N/128, K/128] fp8-block)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from lowbit.kernels import tuning
    (M, K), N = x.shape, w.shape[0]
    bm, bn, bk = config["BM"], config["BN"], config["BK"]
    assert persistent_ok(K, kind), f"the persistent kernel takes int8 or fp8-block with K a multiple of 16 (kind " \
        f"{kind}, K={K})"
    assert x.stride(1) == 1 and w.stride(1) == 1 and bk == FP8_BLOCK, "contiguous rows and BK=128"
    assert kind != KIND_FP8_BLOCK or FP8_BLOCK % bn == 0, "fp8-block: one weight scale per column tile"
    programs = max(1, min(cdiv(M, bm) * cdiv(N, bn), tuning.num_sms()))
    if M:
        _persistent_matmul_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), xs,
            w_scale.reshape(-1) if kind == KIND_INT8_CHANNEL else w_scale, out, M, N, K, cdiv(K, FP8_BLOCK),
            out.stride(0), w_scale.stride(0), KIND=kind, BM=bm, BN=bn, BK=bk, GROUP_M=config.get("GROUP_M", GROUP_M),
            PROGRAMS=programs, num_warps=config.get("num_warps", 8), num_stages=config.get("num_stages", 4),
            **pdl.launch(x.device))
    return out


def unpacked_matmul(x: torch.Tensor, w: torch.Tensor, kind: int, w_scale: torch.Tensor | None = None,
                    config: dict | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16) @ w[N, K]^T for one dense layer -> [M, N] in x's dtype (or out_dtype)."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1] and x.stride(1) == 1, \
        f"x {tuple(x.shape)} vs w {tuple(w.shape)}"
    from lowbit.kernels import tuning
    out_dtype = out_dtype or x.dtype
    config = config or tuning.unpacked_config(x.shape[0], w.shape[0], w.shape[1], kind)
    xq, xs, quant_in = kernel_input(x, kind, x.shape[0] == 1 and not config.get("PERSISTENT"))
    # (a float32 output takes the K splits' atomic adds: zeroed)
    out = (torch.zeros if out_dtype == torch.float32 else torch.empty)(x.shape[0], w.shape[0], dtype=out_dtype,
                                                                        device=x.device)
    return quantized_matmul(xq, xs, w, kind, w_scale, out, config, quant_in)


def quantized_matmul(xq: torch.Tensor, xs: torch.Tensor | None, w: torch.Tensor, kind: int,
                     w_scale: torch.Tensor | None, out: torch.Tensor, config: dict | None = None,
                     quant_in: bool = False) -> torch.Tensor:
    """One dense layer's product on activations quantize_input already quantized (or, quant_in, on the 16-bit row
    kernel_input let through), into out [M, N] (a view of wider rows too: the kernels store through its row
    stride)."""
    from lowbit.kernels import tuning
    config = config or tuning.unpacked_config(xq.shape[0], w.shape[0], w.shape[1], kind)
    if config.get("PERSISTENT"):
        return launch_persistent(xq, xs, w, w_scale, out, kind, config)
    return launch(xq, xs, w.unsqueeze(0), None if w_scale is None else w_scale.unsqueeze(0), out, kind, config,
                  quant_in=quant_in)
