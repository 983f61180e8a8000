"""The fused MoE: token slots sorted by expert, all experts of a layer in one launch per projection.

`align` sorts the T*top_k (token, slot) ids by expert and pads each expert's run to the block size, with device
ops only (no host synchronisation, so decode can be captured in a CUDA graph): the grid is sized by an upper
bound and programs past the padded total exit at once. The gate_up projection reads x[id // top_k] and writes
silu(gate) * up for each id; the down projection reads that row, scales it by the routing weight and writes it
back at its id; the top_k rows of a token are summed at the end.

Expert weights come in any scheme: `PackedExperts` (int4 / int8 in int32 words: w4a16, w8a16, w4a8, w4a8-int8) or
`UnpackedExperts` (bf16, int8 per channel, fp8-block). Experts this rank does not own (expert parallel) are given
the id `-1` by the caller and skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.kernels import act_quant, cdiv, gemv_packed, pdl
from lowbit.kernels import matmul_packed as mp
from lowbit.kernels import matmul_unpacked as mu
from lowbit.kernels import tuning

try:
    import triton
    import triton.language as tl

    from lowbit.kernels.pdl import enter
except ImportError:
    triton = None


ALIGN_KERNEL_MAX_SLOTS = 256  # decode batches (32 tokens x top-8): one launch; larger ones take the torch ops


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] (local expert ids, -1 for none) -> sorted_ids [P] (padding = T*k), block_expert [P / block_m],
    num_padded [1]: the ids of expert e occupy a run starting at a multiple of block_m, in slot order."""
    if topk_ids.is_cuda and topk_ids.numel() <= ALIGN_KERNEL_MAX_SLOTS:
        return align_kernel(topk_ids, num_experts, block_m)
    return align_torch(topk_ids, num_experts, block_m)


def _capacity(n: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted ids can need: every slot, plus a partly filled block per expert reached."""
    capacity = n + min(n, num_experts) * (block_m - 1)
    return -(-capacity // block_m) * block_m


def align_kernel(topk_ids: torch.Tensor, num_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """align in one launch (the torch form takes about 25 at decode sizes): what align_torch returns."""
    flat = topk_ids.flatten().contiguous()
    n = flat.numel()
    capacity = _capacity(n, num_experts, block_m)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=flat.device)
    bn = max(16, triton.next_power_of_2(n))
    _align_kernel[(1,)](flat, sorted_ids, block_expert, num_padded, n, num_experts, capacity, capacity // block_m,
                        BLOCK_M=block_m, BN=bn, CHUNK=32, FILL=256, num_warps=4, **pdl.launch(flat.device))
    return sorted_ids, block_expert, num_padded


if triton is not None:
    @triton.jit
    def _align_kernel(ids_ptr, sorted_ptr, expert_ptr, npad_ptr, n, E, capacity, num_blocks,
                      BLOCK_M: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
                      PDL: tl.constexpr):
        """One program: slot i of expert e goes to start(e) + (slots of e before i), start(e) the padded counts of
        the experts below e; then the blocks take their experts and the rest is padding."""
        enter(PDL)
        i = tl.arange(0, BN)
        e_i = tl.load(ids_ptr + i, mask=i < n, other=-1).to(tl.int32)
        real = e_i >= 0
        rank = tl.zeros([BN], dtype=tl.int32)
        for j0 in tl.static_range(0, BN, CHUNK):
            j = j0 + tl.arange(0, CHUNK)
            e_j = tl.load(ids_ptr + j, mask=j < n, other=-1).to(tl.int32)
            same = (e_j[None, :] == e_i[:, None]) & (j[None, :] < i[:, None])
            rank += tl.sum(same.to(tl.int32), axis=1)
        start = tl.zeros([BN], dtype=tl.int32)
        total = tl.full([], 0, tl.int32)
        for e0 in range(0, E, CHUNK):
            e = e0 + tl.arange(0, CHUNK)
            count = tl.sum(((e_i[:, None] == e[None, :]) & real[:, None]).to(tl.int32), axis=0)
            padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
            start += tl.sum(tl.where(e[None, :] < e_i[:, None], padded[None, :], 0), axis=1)
            total += tl.sum(padded, axis=0)
        pos = start + rank
        for p0 in range(0, capacity, FILL):
            p = p0 + tl.arange(0, FILL)
            tl.store(sorted_ptr + p, tl.full([FILL], 0, tl.int32) + n, mask=p < capacity)
            tl.store(expert_ptr + p, tl.full([FILL], 0, tl.int32) + E - 1, mask=p < num_blocks)
        tl.debug_barrier()  # the fills above land before the scatters below (one block: bar.sync orders them)
        tl.store(sorted_ptr + pos, i, mask=real)
        tl.store(expert_ptr + pos // BLOCK_M, e_i, mask=real)  # every block of a run holds a real slot
        tl.store(npad_ptr, total)


def align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """align in torch operations, any size."""
    flat = topk_ids.flatten().to(torch.int64)
    n = flat.numel()
    skip = flat < 0
    keyed = torch.where(skip, num_experts, flat)  # skipped slots sort after every expert
    # scatter_add, not bincount: bincount reads the largest id back to the host, which a CUDA graph cannot hold
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, keyed, torch.ones_like(keyed))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts:].zero_()  # a device fill: an indexed scalar store copies from the host, which graphs refuse
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(keyed, stable=True)
    e_sorted = keyed[order]
    pos = starts[e_sorted] + torch.arange(n, device=flat.device) - first[e_sorted]
    capacity = _capacity(n, num_experts, block_m)
    sorted_ids = torch.full((capacity + block_m,), n, dtype=torch.int32, device=flat.device)
    pos = torch.where(e_sorted < num_experts, pos, capacity)  # skipped slots land in the spare block
    sorted_ids.scatter_(0, pos, order.to(torch.int32))
    sorted_ids = sorted_ids[:capacity]
    blocks = torch.arange(capacity // block_m, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends[:num_experts], blocks, right=True).clamp(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), ends[num_experts - 1:num_experts].to(torch.int32)


FP8_TENSOR_CORES_FROM_BM = 64  # w4a8 experts: smaller blocks take their rows on the FP8 grid in 16 bits


@dataclass
class PackedExperts:
    weight: mp.PackedWeight  # [E, N, K/...]
    act: int = mp.ACT_NONE
    input_scale: torch.Tensor | None = None  # w4a8: static input scales [E] (or one for all)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.weight.num_experts, self.weight.n, self.weight.k

    def config(self, m: int, n: int, k: int) -> dict:
        return tuning.packed_config(m, n, k, self.weight.bits, self.act, moe=True, paired=self.weight.paired)

    def expert_input_scales(self) -> torch.Tensor:
        """w4a8's static input scales, one per expert (float32 [E])."""
        xs = self.input_scale.float().reshape(-1)
        return xs.expand(self.weight.num_experts).contiguous() if xs.numel() == 1 else xs

    def takes_grid_rows(self, config: dict) -> bool:
        """Whether this projection, launched with config, runs w4a8 on rows put on its experts' FP8 grids in 16 bits
        (what `run` does for them below FP8_TENSOR_CORES_FROM_BM rows a block)."""
        return self.act == mp.ACT_FP8_STATIC and config["BM"] < FP8_TENSOR_CORES_FROM_BM

    def run(self, x, out, moe, config, fuse_silu=False, routed_weights=None, x_row_div=1, slot_experts=None,
            sum_slots=False, out_grid=None, on_grid=False):
        """slot_experts [T*k]: each slot's expert (what w4a8 quantizes a slot's row with at small M); sum_slots:
        out [1, N], one token's slots summed; out_grid: the rows written on those FP8 grids (matmul_packed.launch);
        on_grid: x's rows are on this projection's experts' grids already (a gate_up launch's out_grid)."""
        xq, xs = mp.quantize_input(x, self.act)
        act = self.act
        if act == mp.ACT_FP8_STATIC:
            xs = self.expert_input_scales()
            if on_grid:
                act = mp.ACT_FP8_GRID
            elif self.takes_grid_rows(config) and slot_experts is not None:
                # each slot's row on its expert's FP8 grid once, in 16 bits, then the 16-bit product (the FP8 tensor
                # cores only pay from BM = 64; quantizing in the GEMM repeats it in every N tile)
                xq = act_quant.fp8_grid_rows(x, xs, slot_experts, x_row_div)
                act, x_row_div = mp.ACT_FP8_GRID, 1
        return mp.launch(xq, self.weight, out, act, xs, config, moe=moe, fuse_silu=fuse_silu,
                         routed_weights=routed_weights, x_row_div=x_row_div, sum_slots=sum_slots, out_grid=out_grid)


@dataclass
class UnpackedExperts:
    weight: torch.Tensor  # [E, N, K]
    kind: int = mu.KIND_BF16
    scale: torch.Tensor | None = None  # [E, N] (int8, either kind) or [E, N/128, K/128] (fp8-block)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape)

    def config(self, m: int, n: int, k: int) -> dict:
        return tuning.unpacked_config(m, n, k, self.kind, moe=True)

    def run(self, x, out, moe, config, fuse_silu=False, routed_weights=None, x_row_div=1, slot_experts=None,
            sum_slots=False):
        # one token (a program row per slot): int8 experts quantize their slot's row themselves
        xq, xs, quant_in = mu.kernel_input(x, self.kind, moe is not None and moe[0] is None)
        return mu.launch(xq, xs, self.weight, self.scale, out, self.kind, config, moe=moe, fuse_silu=fuse_silu,
                         routed_weights=routed_weights, x_row_div=x_row_div, sum_slots=sum_slots, quant_in=quant_in)


@dataclass
class DequantizedExperts(UnpackedExperts):
    """Packed experts dequantized to 16 bits for one call (prefill), run by the 16-bit kernel on their scheme's
    activations (matmul_packed.activations_16bit): w4a8's static input scales are in the weights."""
    act: int = mp.ACT_NONE
    input_scale: torch.Tensor | None = None  # w4a8: static input scales [E] (or one for all)

    @classmethod
    def of(cls, experts: PackedExperts, dtype: torch.dtype) -> DequantizedExperts:
        w = mp.dequantize_16bit(experts.weight, dtype, experts.act, experts.input_scale, expert=None)
        return cls(w, act=experts.act, input_scale=experts.input_scale)

    def run(self, x, out, moe, config, fuse_silu=False, routed_weights=None, x_row_div=1, slot_experts=None,
            sum_slots=False):
        rows, x_row_div = mp.activations_16bit(x, self.act, self.input_scale, slot_experts, x_row_div)
        return super().run(rows, out, moe, config, fuse_silu, routed_weights, x_row_div, slot_experts, sum_slots)


# token slots per expert from which packed experts (every packed scheme) run dequantized, 16-bit (H100, 2026-11-24,
# benchmarks/large_m.py, V2-Lite experts: w4a8 at 2048 tokens 1895 vs 2278 us packed, at 1024 1800 vs 1388)
DEQUANT_ROWS_PER_EXPERT = 128
DEQUANT_MAX_BYTES = 2 << 30  # and only where all of a layer's experts fit in this much 16-bit memory (V2-Lite: 1.1 GB)


def _dequantizes(w) -> bool:
    """Experts that run dequantized to 16 bits at prefill: packed ones (every packed scheme), w8a16's int8 and w8a8's
    with activation groups."""
    return isinstance(w, PackedExperts) or (isinstance(w, UnpackedExperts)
                                            and mu.kernel_kind(w.kind) == mu.KIND_INT8_W16)


@dataclass
class GroupedInt8Dequantized(UnpackedExperts):
    """w8a8 experts with activation groups (KIND_INT8_G32) dequantized to 16 bits for one call (prefill): their
    activations as mu.activations_16bit gives them, the 16-bit kernel."""

    def run(self, x, out, moe, config, fuse_silu=False, routed_weights=None, x_row_div=1, slot_experts=None,
            sum_slots=False):
        rows = mu.activations_16bit(x.contiguous(), mu.KIND_INT8_G32)
        return super().run(rows, out, moe, config, fuse_silu, routed_weights, x_row_div, slot_experts, sum_slots)


def _dequantized(w, dtype: torch.dtype) -> UnpackedExperts:
    """_dequantizes' experts in 16 bits, for one call."""
    if isinstance(w, PackedExperts):
        return DequantizedExperts.of(w, dtype)
    weight = mu.dequantize_int8(w.weight, w.scale, dtype)
    return GroupedInt8Dequantized(weight) if w.kind == mu.KIND_INT8_G32 else UnpackedExperts(weight)


def gate_up_config(cfg: dict, packed: bool) -> dict:
    """The gate_up projection's program reads gate and up rows together, 2 * BN weight rows for BN outputs: half the
    heuristic's BN keeps its tile what the heuristic sized, where a whole one spills registers (the packed kernel,
    and the unpacked one from BM = 64: benchmarks/kernel_sass.py --check)."""
    cfg = {key: v for key, v in cfg.items() if key != "SPLIT_K"}  # SiLU needs each output's whole sum
    return dict(cfg, BN=max(16, cfg["BN"] // 2)) if packed or cfg["BM"] >= 64 else cfg


def fused_moe(x: torch.Tensor, w13, w2, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              config: dict | None = None, may_skip: bool = False) -> torch.Tensor:
    """x [T, H]; w13 gate_up experts [E, 2I, H]; w2 down experts [E, H, I]; topk_* [T, k] -> [T, H] in x's dtype.

    Routing weights multiply the down projection's output; experts with id -1 (only where may_skip) are skipped."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, h13 = w13.shape
    _, h2, inter_size = w2.shape
    assert h13 == H and h2 == H and two_i == 2 * inter_size, f"w13 {w13.shape} / w2 {w2.shape} vs hidden {H}"
    n = T * k
    if (T == 1 and config is None and isinstance(w13, PackedExperts) and isinstance(w2, PackedExperts)
            and gemv_packed.ENABLED and gemv_packed.MOE and not w13.weight.paired and not w2.weight.paired):
        return _fused_moe_one_token(x, w13, w2, topk_weights, topk_ids)
    if (config is None and n >= DEQUANT_ROWS_PER_EXPERT * E and _dequantizes(w13) and _dequantizes(w2)
            and E * (two_i * h13 + h2 * inter_size) * x.element_size() <= DEQUANT_MAX_BYTES):
        # prefill: every expert sees many rows; the 16-bit kernel on weights dequantized for this call outruns the
        # packed one there (dense layers: kernels/linear.py PackedLinear)
        w13, w2 = _dequantized(w13, x.dtype), _dequantized(w2, x.dtype)
    per_expert = -(-n // min(n, E))  # rows an expert sees when routing spreads: what the block size should fit
    cfg1 = config or gate_up_config(w13.config(per_expert, inter_size, H), isinstance(w13, PackedExperts))
    cfg2 = config or w2.config(per_expert, H, inter_size)
    bm = cfg1["BM"]
    if cfg2["BM"] != bm:
        cfg2 = dict(cfg2, BM=bm)
    split = 1  # the down projection's K splits (a grouped launch of packed experts takes none)
    if T == 1 and config is None:
        split = one_token_down_split(w2, inter_size, cfg2, k)
    elif isinstance(w2, UnpackedExperts):
        split = cfg2.get("SPLIT_K", 1)
    cfg2 = dict(cfg2, SPLIT_K=split)
    slot_experts = topk_ids.flatten()
    if T == 1:  # one token's slots name distinct experts: a program row per slot, nothing to sort (no align launch)
        moe = (None, slot_experts)
    else:
        sorted_ids, block_expert, num_padded = align(topk_ids, E, bm)
        moe = (sorted_ids, block_expert, num_padded, n)
    inter = torch.empty(n, inter_size, dtype=x.dtype, device=x.device)
    # one token, w4a8 down experts: the gate_up launch writes their input on their FP8 grids (tuning.W4A8_FUSED)
    grid = (T == 1 and tuning.W4A8_FUSED and isinstance(w13, PackedExperts) and isinstance(w2, PackedExperts)
            and w2.takes_grid_rows(cfg2))
    w13.run(x, inter, moe, cfg1, fuse_silu=True, x_row_div=k, slot_experts=slot_experts,
            **({"out_grid": w2.expert_input_scales()} if grid else {}))
    routed = topk_weights.flatten().float().contiguous()
    if T == 1:  # the down projection sums the token's slots (and their K splits) itself: no moe_sum launch
        out = torch.empty(1, H, dtype=x.dtype, device=x.device)
        return w2.run(inter, out, moe, cfg2, routed_weights=routed, slot_experts=slot_experts, sum_slots=True,
                      **({"on_grid": True} if grid else {}))
    if split > 1:  # the down projection's K splits add into float32 (one-token decode: more programs in flight)
        out = torch.zeros(n, H, dtype=torch.float32, device=x.device)
    else:
        out = (torch.zeros if may_skip else torch.empty)(n, H, dtype=x.dtype, device=x.device)
    w2.run(inter, out, moe, cfg2, routed_weights=routed, slot_experts=slot_experts)
    return moe_sum(out.view(T, k, H), x.dtype)


def one_token_down_split(w2, inter_size: int, cfg2: dict, slots: int) -> int:
    """The one-token down projection's K splits: tuning.MOE_SPLIT_K where set (at most the K tiles; packed experts a
    divisor of them, the packed kernel splits K evenly); unset, 2 for packed experts whose programs (the token's
    slots x column blocks) fill under two waves of the chip, tuning.LARGE_UNPACKED_DOWN_SPLITS for large unpacked
    experts of its kinds, else 1."""
    packed = isinstance(w2, PackedExperts)
    k_tiles = cdiv(inter_size, w2.weight.tile_k if packed else cfg2["BK"])
    want = tuning.MOE_SPLIT_K
    if not want and packed:
        want = 2 if slots * cdiv(w2.shape[1], cfg2["BN"]) < 2 * tuning.num_sms() else 1
    elif not want:
        large = w2.shape[1] * inter_size >= tuning.LARGE_EXPERT
        want = tuning.LARGE_UNPACKED_DOWN_SPLITS.get(mu.kernel_kind(w2.kind), 1) if large else 1
    split = max(1, min(want, k_tiles))
    while packed and k_tiles % split:
        split -= 1
    return split


def _fused_moe_one_token(x, w13: PackedExperts, w2: PackedExperts, topk_weights, topk_ids):
    """One token through packed experts: the GEMV (gemv_packed.py), a program row per slot with its expert read
    from topk_ids (no sort by expert), static FP8 inputs quantized inside it, the slots summed by the down
    projection's last program (two launches, where the tensor-core path takes three with moe_sum); another rank's
    experts (-1) add zeros."""
    k = topk_ids.shape[1]
    H = x.shape[1]
    inter_size = w2.weight.k
    slots = topk_ids.reshape(-1)
    inter = torch.empty(k, inter_size, dtype=x.dtype, device=x.device)

    def run(experts, rows, out, fuse_silu, row_div, routed, sum_slots=False):
        xq, xs = gemv_packed.input_rows(rows, experts.act, experts.input_scale)
        if experts.act == mp.ACT_FP8_STATIC and xs.numel() == 1:
            xs = xs.expand(experts.weight.num_experts).contiguous()
        cfg = tuning.gemv_config(experts.weight.n, experts.weight.k, experts.weight.bits, k, fuse_silu)
        gemv_packed.launch(xq, experts.weight, out, experts.act, xs, cfg, slot_experts=slots, fuse_silu=fuse_silu,
                           routed_weights=routed, x_row_div=row_div, sum_slots=sum_slots)

    run(w13, x, inter, True, k, None)
    out = torch.empty(1, H, dtype=x.dtype, device=x.device)
    # the down projection sums the token's slots itself (no moe_sum launch)
    run(w2, inter, out, False, 1, topk_weights.reshape(-1).float().contiguous(), sum_slots=True)
    return out


if triton is not None:
    @triton.jit
    def _moe_sum_kernel(x_ptr, out_ptr, K, H, stride_t, stride_k, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One token, BLOCK features: the sum of its K slot rows in float32, rounded once."""
        enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(K):
            acc += tl.load(x_ptr + t * stride_t + j * stride_k + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_sum(parts: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """parts [T, k, H] (each slot's weighted expert output) -> [T, H] in `dtype` (parts' by default): what
    parts.sum(1) computes, in one launch (torch's reduction took 5.5 us a layer at batch-1 decode on an H100,
    2026-11-23)."""
    T, k, H = parts.shape
    assert parts.stride(2) == 1
    out = torch.empty(T, H, dtype=dtype or parts.dtype, device=parts.device)
    if T:
        block = min(1024, triton.next_power_of_2(H))
        _moe_sum_kernel[(T, triton.cdiv(H, block))](parts, out, k, H, parts.stride(0), parts.stride(1),
                                                    out.stride(0), BLOCK=block, num_warps=4, **pdl.launch(parts.device))
    return out


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, act1=None, act2=None) -> torch.Tensor:
    """float64 reference: w13 [E, 2I, H] and w2 [E, H, I] dequantized float weights; act1/act2 fake-quantize the
    inputs of the two projections (None: as they are)."""
    T, _ = x.shape
    inter_size = w2.shape[2]
    out = torch.zeros(T, w2.shape[1], dtype=torch.float64)
    xin = (act1(x) if act1 else x).double()
    for t in range(T):
        for slot, e in enumerate(topk_ids[t].tolist()):
            if e < 0:
                continue
            gu = w13[e].double() @ xin[t]
            h = torch.nn.functional.silu(gu[:inter_size]) * gu[inter_size:]
            h = h.to(x.dtype)  # the kernel stores the intermediate in x's dtype
            h = (act2(h[None])[0] if act2 else h).double()
            out[t] += topk_weights[t, slot].double() * (w2[e].double() @ h)
    return out
