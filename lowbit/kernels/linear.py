"""A quantized linear layer's weights in the GPU kernels' layout, built once at load time from its checkpoint tensors.

`kernel_weight(...)` is what the quant methods call from process_weights_after_loading; it returns None for a
combination no kernel covers (the method then keeps its torch reference path). `stack_experts` turns the per-expert
weights of a MoE layer into the [E, ...] tensors the fused MoE reads.

Whether the kernels run is decided once per layer, from its device and LOWBIT_KERNELS: "0" never, "1" always where
Triton imports (on the CPU that means Triton's interpreter: the tests use it), unset: on CUDA devices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lowbit.kernels import cdiv, gemv_packed, matmul_packed as mp, matmul_unpacked as mu, moe, triton_available


# w8a16 (int8 per channel, 16-bit activations) unpacked: the int8 values as they are, [N, K] / the experts' [E, N, K],
# on the unpacked kernel (KIND_INT8_W16: each tile turned into the activations' dtype, exactly, for the 16-bit tensor
# cores; the channel scale at the end) in place of the packed kernel's 8-bit planes; LOWBIT_W8A16_UNPACKED=0 keeps
# the planes. H100, 2026-11-25, batch-1 decode graph (pdl-decode-v2-lite-...-2026-11-25-w8a16-unpacked.md,
# layer-ratio-r1-...-2026-11-25-w8a16-unpacked.md): V2-Lite's MoE layer 87.1 -> 76.7 us with the experts unpacked,
# 75.1 with the dense layers too; R1's 307.0 -> 297.3 us, 1.48x -> 1.54x bf16's
W8A16_UNPACKED = os.environ.get("LOWBIT_W8A16_UNPACKED", "1") == "1"
# dense int4 layers off the one-row GEMV in the paired layout (dense_layout); LOWBIT_DENSE_PAIRED=0 keeps them planar
DENSE_PAIRED = os.environ.get("LOWBIT_DENSE_PAIRED", "1") == "1"


def kernels_enabled(device: torch.device) -> bool:
    env = os.environ.get("LOWBIT_KERNELS")
    if env == "0" or not triton_available():
        return False
    return env == "1" or device.type == "cuda"


# packed layers with more rows than this run dequantize + the matrix library: from 128 rows on it was faster for
# every packed scheme on R1's three dense shapes (H100, 2026-11-24, benchmarks/large_m.py: 36864x7168 at M = 128
# w4a16 469 vs 570 us, w4a8 488 vs 531; at 64 the packed kernel: 252 vs 467)
DEQUANT_ABOVE_ROWS = 64


@dataclass
class PackedLinear:
    weight: mp.PackedWeight
    act: int
    input_scale: torch.Tensor | None

    def runs_dequantized(self, rows: int) -> bool:
        """Whether a call on this many rows runs the matrix library on dequantized weights (tuning skips those)."""
        return rows > DEQUANT_ABOVE_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_dequantized(x.shape[0]):
            # many rows (prefill): the weights dequantized into a transient bf16/fp16 buffer and the matrix library,
            # whose large-M rate the packed kernel does not reach (H100, 2026-11-23: 0.23x cuBLAS at M = 4096,
            # while dequantizing costs about one read of the packed and one write of the 16-bit weights); w4a8's
            # activations on the FP8 grid (exact in 16 bits) with its input scale in the weights, the per-token
            # schemes' as their quantized values times the token's scale
            rows, _ = mp.activations_16bit(x.contiguous(), self.act, self.input_scale)
            return torch.nn.functional.linear(rows, mp.dequantize_16bit(self.weight, x.dtype, self.act,
                                                                        self.input_scale))
        return mp.packed_matmul(x.contiguous(), self.weight, self.act, self.input_scale)

    def dequantized(self) -> torch.Tensor:
        return mp.unpack(self.weight)[0]


@dataclass
class UnpackedLinear:
    weight: torch.Tensor  # [N, K]
    kind: int
    scale: torch.Tensor | None

    def runs_dequantized(self, rows: int) -> bool:
        """w8a16's int8 weights and w8a8's with activation groups above DEQUANT_ABOVE_ROWS rows, as PackedLinear."""
        return mu.kernel_kind(self.kind) == mu.KIND_INT8_W16 and rows > DEQUANT_ABOVE_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_dequantized(x.shape[0]):
            # prefill: the 16-bit weights in a transient buffer and the matrix library, as PackedLinear does; w8a8's
            # grouped activations as their codes times their group's scale, rounded once to x's dtype (the int8
            # kernel's product scaled per 32 features ran at 0.3-0.4x bf16's rate at 4096 rows: H100, 2026-11-25,
            # w8a8-groups-h100-80gb-hbm3-2026-11-25.md)
            x = mu.activations_16bit(x.contiguous(), self.kind)
            return torch.nn.functional.linear(x, mu.dequantize_int8(self.weight[None], self.scale[None], x.dtype)[0])
        return mu.unpacked_matmul(x.contiguous(), self.weight, self.kind, self.scale)

    def dequantized(self) -> torch.Tensor:
        from lowbit.quant.formats import dequantize_values
        from lowbit.quant.schemes import QuantArgs
        if self.kind in mu.CHANNEL_SCALED:
            return dequantize_values(self.weight, self.scale, None, QuantArgs(8, "int", "channel"))
        if self.kind == mu.KIND_FP8_BLOCK:
            block = (mu.FP8_BLOCK, mu.FP8_BLOCK)
            return dequantize_values(self.weight, self.scale, None, QuantArgs(8, "float", "block",
                                                                              block_structure=block))
        return self.weight.float()


@dataclass
class ColumnParts:
    """Layers merged along their outputs whose block scales restart at each part (fp8-block gate and up of 10944
    rows each, V2-Lite's dense MLP: a 128-row block would straddle the two), each part its own UnpackedLinear: the
    activations quantized once, each part's product written into its columns of one output."""
    parts: list[UnpackedLinear]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        xq, xs = mu.quantize_input(x, self.parts[0].kind)
        sizes = [p.weight.shape[0] for p in self.parts]
        out = torch.empty(x.shape[0], sum(sizes), dtype=x.dtype, device=x.device)
        start = 0
        for p, n in zip(self.parts, sizes, strict=True):
            mu.quantized_matmul(xq, xs, p.weight, p.kind, p.scale, out[:, start:start + n])
            start += n
        return out

    def dequantized(self) -> torch.Tensor:
        return torch.cat([p.dequantized() for p in self.parts])


def activation_kind(input_activations) -> int | None:
    """The packed kernel's activation mode for a scheme's input activations (None: no kernel for them)."""
    a = input_activations
    if a is None:
        return mp.ACT_NONE
    if a.type == "float" and a.num_bits == 8:
        if not a.dynamic and a.strategy == "tensor":
            return mp.ACT_FP8_STATIC
        if a.dynamic and a.strategy == "token":
            return mp.ACT_FP8_TOKEN
    if a.type == "int" and a.num_bits == 8 and a.dynamic and a.strategy == "token":
        return mp.ACT_INT8_TOKEN
    return None


def dense_layout(pw: mp.PackedWeight, act: int) -> mp.PackedWeight:
    """The layout a dense packed layer keeps: planar where one row takes the GEMV (gemv_packed.takes, which reads the
    planar layout only), otherwise the experts' rule (matmul_packed.experts_layout: paired for symmetric int4 whose
    products run in 16 bits; LOWBIT_INT4_PAIRED=0 keeps planar). H100, 2026-11-25, w4a16 at one row
    (fold-scales-h100-80gb-hbm3-2026-11-25.md): R1's o_proj 7168 x 16384 40.2 -> 31.5 us paired, dense down 43.1 ->
    34.4, dense gate_up 70.8 -> 63.8; V2-Lite's dense gate_up 19.7 -> 18.9."""
    if not DENSE_PAIRED or gemv_packed.takes(1, pw.n, pw.k):
        return pw
    return mp.experts_layout(pw, act)


def packed_linear(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, weights,
                  input_activations, input_scale: torch.Tensor | None) -> PackedLinear | None:
    """values [N, K] signed ints, scale [N, groups], zero_point like scale or None -> PackedLinear, an UnpackedLinear
    (w8a16 per channel, W8A16_UNPACKED) or None."""
    act = activation_kind(input_activations)
    if act is None or weights.num_bits not in (4, 8):
        return None
    group = weights.group_size if weights.strategy == "group" else 0
    if weights.strategy not in ("group", "channel"):
        return None
    if (W8A16_UNPACKED and act == mp.ACT_NONE and weights.num_bits == 8 and not group
            and zero_point is None):
        # int8 per channel, 16-bit activations: the values as they are and one float32 scale a channel
        return UnpackedLinear(values.to(torch.int8).contiguous(), mu.KIND_INT8_W16,
                              scale.data.float().reshape(-1, 1).contiguous())
    plane = mp.default_tile_k(weights.num_bits) // (32 // weights.num_bits)
    if group % plane:
        return None
    pw = mp.repack(values[None], scale[None], None if zero_point is None else zero_point[None],
                   weights.num_bits, group)
    return PackedLinear(dense_layout(pw, act), act,
                        None if input_scale is None else input_scale.data.float().reshape(1).clone())


def int8_linear(weight: torch.Tensor, scale: torch.Tensor, weights, input_activations) -> UnpackedLinear | None:
    """w8a8: int8 per-channel weights with int8 dynamic activations, per token or per token and 32 features."""
    a = input_activations
    if weights.strategy != "channel" or a is None or not (a.type == "int" and a.num_bits == 8 and a.dynamic):
        return None
    if a.strategy == "token":
        kind = mu.KIND_INT8_CHANNEL
    elif a.strategy == "group" and a.group_size == mu.ACT_GROUP:
        kind = mu.KIND_INT8_G32
    else:
        return None
    # .data: a tensor of its own, which the layer's parameter giving up its storage does not empty
    return UnpackedLinear(weight.data.contiguous(), kind, scale.data.float().reshape(-1, 1).contiguous())


def fp8_block_linear(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                     part_sizes: list[int] | None = None) -> UnpackedLinear | ColumnParts | None:
    """part_sizes: the rows of merged layers (gate, up) where a part before the last is not a multiple of the block,
    so each part's block scales start a row of their own: a ColumnParts of one UnpackedLinear each."""
    if tuple(block) != (mu.FP8_BLOCK, mu.FP8_BLOCK):
        return None
    if part_sizes is None or all(n % mu.FP8_BLOCK == 0 for n in part_sizes[:-1]):
        # (a last part of a partial block ends the scales' last row: row // 128 indexes them as it is)
        return UnpackedLinear(weight.data.contiguous(), mu.KIND_FP8_BLOCK, scale.data.float().contiguous())
    parts, row, block_row = [], 0, 0
    for n in part_sizes:
        blocks = cdiv(n, mu.FP8_BLOCK)
        parts.append(UnpackedLinear(weight.data[row:row + n].contiguous(), mu.KIND_FP8_BLOCK,
                                    scale.data[block_row:block_row + blocks].float().contiguous()))
        row, block_row = row + n, block_row + blocks
    return ColumnParts(parts)


def _packed_alike(p, first: PackedLinear) -> bool:
    """p is a PackedLinear of first's configuration: activations, bits, groups, K and its tiling, zero points."""
    w = first.weight
    return (isinstance(p, PackedLinear) and p.act == first.act and p.weight.bits == w.bits
            and p.weight.group_size == w.group_size and p.weight.k == w.k and p.weight.tile_k == w.tile_k
            and (p.weight.zeros is None) == (w.zeros is None))


def stack_experts(parts: list) -> moe.PackedExperts | moe.UnpackedExperts | None:
    """Per-expert PackedLinear / UnpackedLinear / bf16 weight tensors (one kind, one configuration) -> [E, ...]."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(p, torch.Tensor) and p.shape == first.shape for p in parts):
            return moe.UnpackedExperts(torch.stack(parts).contiguous(), mu.KIND_BF16)
        return None
    if isinstance(first, PackedLinear):
        if not all(_packed_alike(p, first) and p.weight.n == first.weight.n for p in parts):
            return None
        w = first.weight
        # the experts' layout (LOWBIT_INT4_PAIRED) expert by expert: no second copy of a whole layer's words
        laid = [mp.experts_layout(p.weight, first.act) for p in parts]
        pw = mp.PackedWeight(torch.cat([e.words for e in laid]), torch.cat([e.scales for e in laid]),
                             None if w.zeros is None else torch.cat([e.zeros for e in laid]),
                             w.bits, w.group_size, w.n, w.k, w.tile_k, paired=laid[0].paired)
        scale = None
        if first.act == mp.ACT_FP8_STATIC:  # each expert keeps its own calibrated input scale
            scale = torch.cat([p.input_scale.reshape(1) for p in parts])
        return moe.PackedExperts(pw, first.act, scale)
    if isinstance(first, UnpackedLinear):
        if not all(isinstance(p, UnpackedLinear) and p.kind == first.kind and p.weight.shape == first.weight.shape
                   for p in parts):
            return None
        scale = None if first.scale is None else torch.stack([p.scale for p in parts])
        if first.kind in mu.CHANNEL_SCALED:
            scale = scale.reshape(len(parts), -1)
        return moe.UnpackedExperts(torch.stack([p.weight for p in parts]).contiguous(), first.kind, scale)
    return None


@dataclass
class RowsProduct:
    """Linear layers of one input in one product, their weights stacked along the output rows: x [T, K] -> each
    layer's output, views of one [T, sum(sizes)] tensor."""
    part: object  # PackedLinear | UnpackedLinear | a 16-bit weight tensor
    sizes: list[int]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.nn.functional.linear(x, self.part) if isinstance(self.part, torch.Tensor) else self.part(x)
        return y.split(self.sizes, dim=-1)


def cat_products(parts: list) -> RowsProduct | None:
    """Kernel parts of layers that read the same input (LinearBase.kernel_part) -> one RowsProduct, where they are of
    one kind and configuration: their products then cost one launch where they cost one each (DeepSeek's q and
    kv_a projections: vLLM's and SGLang's fused_qkv_a_proj). None otherwise, as where static FP8 input scales
    differ or a 128x128 scale block would straddle two layers."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        same = all(isinstance(p, torch.Tensor) and p.dtype == first.dtype and p.shape[1] == first.shape[1]
                   for p in parts)
        sizes = [p.shape[0] for p in parts] if same else []
    elif isinstance(first, PackedLinear):  # one static input scale for all: equal ones only
        same = all(_packed_alike(p, first) and (p.input_scale is None) == (first.input_scale is None)
                   and (p.input_scale is None or torch.equal(p.input_scale, first.input_scale)) for p in parts)
        sizes = [p.weight.n for p in parts] if same else []
    elif isinstance(first, UnpackedLinear):
        same = all(isinstance(p, UnpackedLinear) and p.kind == first.kind
                   and p.weight.shape[1] == first.weight.shape[1] and p.weight.dtype == first.weight.dtype
                   and (p.scale is None) == (first.scale is None) for p in parts)
        if same and first.kind == mu.KIND_FP8_BLOCK:  # each block row of scales covers one layer's rows alone
            same = all(p.weight.shape[0] % mu.FP8_BLOCK == 0 for p in parts[:-1])
        sizes = [p.weight.shape[0] for p in parts] if same else []
    else:
        return None
    return RowsProduct(_cat_rows(parts), sizes) if sizes else None


def _rows_cols(part, rows: slice, cols: slice):
    """A bf16 weight / PackedLinear / UnpackedLinear restricted to rows x cols; None where the cut is off the
    weight's scale grid (groups, 128x128 blocks)."""
    if isinstance(part, torch.Tensor):
        return part[rows, cols]
    if isinstance(part, PackedLinear):
        pw = mp.slice_rows_cols(part.weight, rows, cols)
        return None if pw is None else PackedLinear(pw, part.act, part.input_scale)
    if isinstance(part, UnpackedLinear):
        w, scale = part.weight[rows, cols], part.scale
        if part.kind in mu.CHANNEL_SCALED:
            scale = scale[rows]
        elif part.kind == mu.KIND_FP8_BLOCK:
            b = mu.FP8_BLOCK
            (r0, r1, _), (c0, c1, _) = rows.indices(part.weight.shape[0]), cols.indices(part.weight.shape[1])
            if r0 % b or c0 % b or (r1 % b and r1 != part.weight.shape[0]) or (c1 % b and c1 != part.weight.shape[1]):
                return None
            scale = scale[r0 // b:cdiv(r1, b), c0 // b:cdiv(c1, b)]
        return UnpackedLinear(w.contiguous(), part.kind, None if scale is None else scale.contiguous())
    return None


def _cat_rows(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, PackedLinear):
        return PackedLinear(dense_layout(mp.cat_rows([p.weight for p in parts]), first.act), first.act,
                            first.input_scale)
    scale = None if first.scale is None else torch.cat([p.scale for p in parts])
    return UnpackedLinear(torch.cat([p.weight for p in parts]), first.kind, scale)


def split_shared(gate_up, down, n: int) -> tuple[list, list] | None:
    """A shared MLP n experts wide (gate_up [2S, H], down [H, S], as kernel parts) -> n gate_up parts [2S/n, H] and
    n down parts [H, S/n], each piece an expert's shape, for the fused MoE to run as n more experts (SGLang's
    shared-experts fusion); None where a cut is off the weights' scale grid."""
    if not all(isinstance(p, (torch.Tensor, PackedLinear, UnpackedLinear)) for p in (gate_up, down)):
        return None  # (a ColumnParts: no expert's shape)
    if n == 1:
        return [gate_up], [down]
    two_s = gate_up.shape[0] if isinstance(gate_up, torch.Tensor) else (
        gate_up.weight.n if isinstance(gate_up, PackedLinear) else gate_up.weight.shape[0])
    s = two_s // 2
    if s % n:
        return None
    i = s // n
    every = slice(None)
    pieces13, pieces2 = [], []
    for j in range(n):
        gate = _rows_cols(gate_up, slice(j * i, (j + 1) * i), every)
        up = _rows_cols(gate_up, slice(s + j * i, s + (j + 1) * i), every)
        dn = _rows_cols(down, every, slice(j * i, (j + 1) * i))
        if gate is None or up is None or dn is None:
            return None
        pieces13.append(_cat_rows([gate, up]))
        pieces2.append(dn)
    return pieces13, pieces2
