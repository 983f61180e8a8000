"""The compressed-tensors tensor layouts, as pure functions: quantized values -> checkpoint tensors and back.

One function per format turns a module's stored tensors into its float weight (the runtime's reference path and
the oracle for GPU kernels); `compress` writes the same tensors llm-compressor would, with the names vLLM's
compressed-tensors loader looks for:

- pack-quantized: `weight_packed` int32 (32/num_bits values per word along the input dim, each offset by
  2^(bits-1), lowest bits first), `weight_scale`, `weight_shape` int64 [2], and for asymmetric weights
  `weight_zero_point` int32 packed the same way along the output dim;
- int-quantized: `weight` int8, `weight_scale`;
- float-quantized: `weight` float8_e4m3fn, `weight_scale` float32;

plus `input_scale` float32 [1] when activations are quantized with a static scale. A weight is dequantized as
`(q - zero_point) * scale`, the scale and zero point repeated over their group (or block) of the weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.schemes import QuantArgs

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class QuantizedWeight:
    """One linear layer's weight after quantization.

    values: [out, in] int8 holding signed integers (int schemes) or float8_e4m3fn (fp8 schemes);
    scale: [out, groups] for group strategy, [out, 1] for channel, [ceil(out/bo), ceil(in/bi)] for block;
    zero_point: same shape as scale, int8, asymmetric schemes only.
    """
    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    args: QuantArgs

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)


def int_range(num_bits: int) -> tuple[int, int]:
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


# ---------------------------------------------------------------------------------------------- int32 packing
def pack_int32(values: torch.Tensor, num_bits: int, dim: int = 1) -> torch.Tensor:
    """Signed integers [rows, cols] (any int dtype) -> int32 words, 32/num_bits values per word along `dim`.

    Value j of a word sits at bits [j*num_bits, (j+1)*num_bits), stored as value + 2^(num_bits-1). Only bit widths
    that divide 32 are packed (4 and 8 here), so no value straddles two words.
    """
    if 32 % num_bits:
        raise ValueError(f"cannot pack {num_bits}-bit values into int32 words")
    per_word = 32 // num_bits
    v = values.to(torch.int64) + (1 << (num_bits - 1))  # unsigned
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    pad = -cols % per_word
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.view(rows, -1, per_word)  # [rows, words, per_word]
    shifts = torch.arange(per_word, dtype=torch.int64, device=v.device) * num_bits
    words = (v << shifts).sum(-1)  # [rows, words], < 2^32
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words.contiguous()


def unpack_int32(words: torch.Tensor, num_bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """The inverse of pack_int32: int32 words -> signed int8 values, `size` of them along `dim`."""
    per_word = 32 // num_bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * num_bits
    v = (w[..., None] >> shifts) & ((1 << num_bits) - 1)  # [rows, words, per_word]
    v = v.flatten(-2)[:, :size] - (1 << (num_bits - 1))
    v = v.to(torch.int8)
    return v.t().contiguous() if dim == 0 else v


# ---------------------------------------------------------------------------------------------- dequantization
def expand_groups(t: torch.Tensor, out_features: int, in_features: int, args: QuantArgs) -> torch.Tensor:
    """A per-group (or per-channel, per-block, per-tensor) tensor repeated to the weight's [out, in] shape."""
    if args.strategy == "group":
        return t.repeat_interleave(args.group_size, dim=1)[:, :in_features].expand(out_features, in_features)
    if args.strategy == "block":
        bo, bi = args.block_structure
        return t.repeat_interleave(bo, 0)[:out_features].repeat_interleave(bi, 1)[:, :in_features]
    return t.reshape(-1, 1).expand(out_features, in_features) if t.numel() > 1 else t.reshape(1, 1).expand(
        out_features, in_features)


def dequantize_values(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      args: QuantArgs) -> torch.Tensor:
    """(values - zero_point) * scale in float32, scale and zero point repeated over their groups."""
    out_f, in_f = values.shape
    w = values.float()
    if zero_point is not None:
        w = w - expand_groups(zero_point, out_f, in_f, args).float()
    return w * expand_groups(scale, out_f, in_f, args).float()


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    return dequantize_values(qw.values, qw.scale, qw.zero_point, qw.args)


def dequant_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                           weight_zero_point: torch.Tensor | None, shape: tuple[int, int],
                           args: QuantArgs) -> torch.Tensor:
    """pack-quantized tensors -> float32 weight [out, in]."""
    out_f, in_f = shape
    values = unpack_int32(weight_packed, args.num_bits, in_f, dim=1)
    zp = None
    if weight_zero_point is not None:
        zp = unpack_int32(weight_zero_point, args.num_bits, out_f, dim=0)
    return dequantize_values(values, weight_scale, zp, args)


def dequant_int_quantized(weight: torch.Tensor, weight_scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """int-quantized tensors (int8 `weight`) -> float32 weight."""
    return dequantize_values(weight, weight_scale, None, args)


def dequant_float_quantized(weight: torch.Tensor, weight_scale: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """float-quantized tensors (float8_e4m3fn `weight`) -> float32 weight."""
    return dequantize_values(weight, weight_scale, None, args)


# ---------------------------------------------------------------------------------------------- compression
def compress(qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    """One module's checkpoint tensors (local names) for a quantized weight in compressed-tensors format `fmt`."""
    args = qw.args
    if fmt == "pack-quantized":
        out = {"weight_packed": pack_int32(qw.values, args.num_bits, dim=1), "weight_scale": qw.scale,
               "weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}
        if qw.zero_point is not None:
            out["weight_zero_point"] = pack_int32(qw.zero_point, args.num_bits, dim=0)
        return out
    if fmt in ("int-quantized", "float-quantized"):
        if qw.zero_point is not None:
            raise ValueError(f"{fmt}: asymmetric weights are not supported")
        return {"weight": qw.values, "weight_scale": qw.scale}
    raise ValueError(f"unknown compressed-tensors format {fmt!r}")


def decompress(tensors: dict[str, torch.Tensor], args: QuantArgs, fmt: str) -> torch.Tensor:
    """A module's checkpoint tensors (local names) -> its float32 weight."""
    if fmt == "pack-quantized":
        shape = tuple(int(d) for d in tensors["weight_shape"])
        return dequant_pack_quantized(tensors["weight_packed"], tensors["weight_scale"],
                                      tensors.get("weight_zero_point"), shape, args)
    if fmt == "int-quantized":
        return dequant_int_quantized(tensors["weight"], tensors["weight_scale"], args)
    if fmt == "float-quantized":
        return dequant_float_quantized(tensors["weight"], tensors["weight_scale"], args)
    raise ValueError(f"unknown compressed-tensors format {fmt!r}")
