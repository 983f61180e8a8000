"""Linear methods, one per checkpoint format: which tensors a quantized layer holds and how it multiplies by them.

Each `apply` here is the torch reference path (CPU, and the oracle for the GPU kernels in `lowbit.kernels`): the
packed tensors stay the source of truth, `dequantized_weight` turns them into the float weight through the one
function of `lowbit.quant.formats` for that format, and activations are fake-quantized as the scheme says
(FP8 e4m3 static per-tensor through `input_scale`, int8 per-token or per-token-group dynamic, FP8 per-token-group
dynamic).
"""
from __future__ import annotations

import logging
import re
from typing import Callable

import torch
import torch.nn.functional as F

from lowbit.kernels import linear as kl
from lowbit.kernels.act_quant import int8_per_token_group_ref
from lowbit.kernels.linear import kernels_enabled
from lowbit.layers.linear import LinearBase, LinearMethod
from lowbit.quant.formats import (FP8_MAX, dequant_float_quantized, dequant_int_quantized, dequant_pack_quantized,
                                  unpack_int32)
from lowbit.quant.schemes import QuantArgs


log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()


def _warn_torch_path(layer: LinearBase, method: str) -> None:
    """Say once per layer kind (its name with the numbers starred, and its method) that no kernel takes its
    weights: the reference path dequantizes them on every call, tens of times slower at decode, and nothing
    else would show it (V2-Lite's fp8-block dense gate_up ran so for eight sessions)."""
    kind = re.sub(r"\.\d+\.", ".*.", f".{layer.prefix}.")[1:-1]
    if (kind, method) in _WARNED:
        return
    _WARNED.add((kind, method))
    log.warning("%s (%s, %d x %d): no GPU kernel takes these weights; the torch reference path dequantizes them on "
                "every call (slow)", kind, method, layer.out_per_partition, layer.in_per_partition)


def fp8_block_dequant(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [out, in] fp8, scale [ceil(out/bo), ceil(in/bi)] -> w * scale per block, float32."""
    return dequant_float_quantized(w, scale, QuantArgs(8, "float", "block", block_structure=tuple(block)))


# ---------------------------------------------------------------------------------------------- activations
def fake_quant_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, in] through FP8 e4m3 with one calibrated per-tensor scale, back to x's dtype."""
    s = scale.float().reshape(())
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [T, in] through int8 with one dynamic scale per token (absmax / 127), back to x's dtype."""
    return fake_quant_int8_per_token_group(x, x.shape[-1])


def fake_quant_int8_per_token_group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., in] through int8 with one dynamic scale per token and group of `group_size` features
    (act_quant.int8_per_token_group_ref: absmax / 127, rounded half to even as the kernels), back to x's dtype."""
    n = x.shape[-1]
    q, s = int8_per_token_group_ref(x.reshape(-1, n), group_size)
    return (q.float() * s.repeat_interleave(group_size, dim=1)[:, :n]).to(x.dtype).view(x.shape)


def fake_quant_fp8_per_token_group(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, in] through FP8 e4m3 with one dynamic scale per token and group of `group_size` features."""
    T, n = x.shape
    xf = F.pad(x.float(), (0, -n % group_size)).view(T, -1, group_size)  # [T, G, g]
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).view(T, -1)[:, :n].to(x.dtype)


def activation_quantizer(args: QuantArgs | None) -> Callable[[LinearBase, torch.Tensor], torch.Tensor] | None:
    """The fake-quantization of a layer's input that `args` describes (None: inputs stay in the model dtype)."""
    if args is None:
        return None
    if args.type == "float" and args.num_bits == 8:
        if not args.dynamic and args.strategy == "tensor":
            return lambda layer, x: fake_quant_fp8_static(x, layer.input_scale)
        if args.dynamic and args.strategy == "group":
            return lambda layer, x: fake_quant_fp8_per_token_group(x, args.group_size)
        if args.dynamic and args.strategy == "token":
            return lambda layer, x: fake_quant_fp8_per_token_group(x, x.shape[-1])
    if args.type == "int" and args.num_bits == 8 and args.dynamic and args.strategy == "token":
        return lambda layer, x: fake_quant_int8_per_token(x)
    if args.type == "int" and args.num_bits == 8 and args.dynamic and args.strategy == "group":
        return lambda layer, x: fake_quant_int8_per_token_group(x, args.group_size)
    raise ValueError(f"input activations {args.to_dict()} are not supported")


# ---------------------------------------------------------------------------------------------- loaders
def _load_max(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """A static input scale of a merged layer: its parts read the same input, so keep the largest scale."""
    loaded = loaded.reshape(param.shape).to(param.dtype)
    param.data.copy_(loaded if shard_id in (None, 0) else torch.maximum(param.data, loaded))


def _shape_loader(layer: LinearBase) -> Callable:
    def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        want = (layer.output_sizes[shard_id or 0], layer.input_size)
        if tuple(int(d) for d in loaded) != want:
            raise ValueError(f"{layer.prefix}: weight_shape {loaded.tolist()} does not match the layer's {list(want)}")
    return load


# ---------------------------------------------------------------------------------------------- methods
class QuantizedLinearMethod(LinearMethod):
    """Shared by every quantized format: optional static input scale, activation fake-quant, and a dequantized
    copy of the weight kept for the CPU reference path."""

    def __init__(self, weights: QuantArgs, input_activations: QuantArgs | None = None):
        self.weights = weights
        self.input_activations = input_activations
        self.act_quant = activation_quantizer(input_activations)

    def _create_input_scale(self, layer: LinearBase) -> None:
        a = self.input_activations
        if a is not None and not a.dynamic:
            layer.register("input_scale", torch.ones(1, dtype=torch.float32), weight_loader=_load_max)

    def _scale_shape(self, layer: LinearBase) -> tuple[list[int], int | None]:
        w = self.weights
        out_f, in_f = layer.out_per_partition, layer.in_per_partition
        if w.strategy == "group":
            if in_f % w.group_size:
                raise ValueError(f"{layer.prefix}: input features {in_f} are not a multiple of the weight group "
                                 f"size {w.group_size}")
            return [out_f, in_f // w.group_size], 1
        if w.strategy == "channel":
            return [out_f, 1], None
        raise ValueError(f"{layer.prefix}: {w.strategy} weight scales are not supported for this format")

    def kernel_weight(self, layer: LinearBase):
        """This layer's weights in the GPU kernels' layout (lowbit.kernels.linear), or None where no kernel fits."""
        return None

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        device = layer.weight_scale.device if hasattr(layer, "weight_scale") else layer.weight.device
        if kernels_enabled(device):
            layer._kernel = self.kernel_weight(layer)
            if layer._kernel is not None:
                # the kernel's copy is the weight from now on: drop the checkpoint-layout tensors
                for name, p in list(layer.named_parameters(recurse=False)):
                    if name != "bias":
                        p.data = p.data.new_empty(0)
                return
            _warn_torch_path(layer, type(self).__name__)
        if device.type == "cpu":
            # the CPU has no low-bit matmul: keep the dequantized weight in the compute dtype
            layer._dequant = self.dequantized_weight(layer).to(layer.params_dtype)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        kernel = getattr(layer, "_kernel", None)
        if kernel is not None:
            return kernel(x)
        if self.act_quant is not None:
            x = self.act_quant(layer, x)
        w = getattr(layer, "_dequant", None)
        if w is None:
            w = self.dequantized_weight(layer).to(x.dtype)
        return F.linear(x, w)


class PackedLinearMethod(QuantizedLinearMethod):
    """pack-quantized: int4 / int8 weights packed into int32 words, group or channel scales, optional zero points."""

    def create_weights(self, layer: LinearBase) -> None:
        w = self.weights
        per_word = 32 // w.num_bits
        out_f, in_f = layer.out_per_partition, layer.in_per_partition
        if in_f % per_word:
            raise ValueError(f"{layer.prefix}: input features {in_f} are not a multiple of {per_word} "
                             f"({w.num_bits}-bit values per int32)")
        layer.register("weight_packed", torch.zeros(out_f, in_f // per_word, dtype=torch.int32),
                       output_dim=0, input_dim=1)
        scale_shape, scale_in_dim = self._scale_shape(layer)
        layer.register("weight_scale", torch.ones(scale_shape, dtype=layer.params_dtype), output_dim=0,
                       input_dim=scale_in_dim)
        if not w.symmetric:
            for size in layer.output_partition_sizes:
                if size % per_word:
                    raise ValueError(f"{layer.prefix}: output size {size} is not a multiple of {per_word}, as "
                                     f"packed zero points need")
            layer.register("weight_zero_point", torch.zeros(-(-out_f // per_word), scale_shape[1],
                                                            dtype=torch.int32),
                           output_dim=0, input_dim=scale_in_dim)
        layer.register("weight_shape", torch.tensor([out_f, in_f], dtype=torch.int64),
                       weight_loader=_shape_loader(layer))
        self._create_input_scale(layer)

    def kernel_weight(self, layer: LinearBase):
        w = self.weights
        values = unpack_int32(layer.weight_packed, w.num_bits, layer.in_per_partition, dim=1)
        zp = getattr(layer, "weight_zero_point", None)
        if zp is not None:
            zp = unpack_int32(zp, w.num_bits, layer.out_per_partition, dim=0)
        return kl.packed_linear(values, layer.weight_scale, zp, w, self.input_activations,
                                getattr(layer, "input_scale", None))

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        if getattr(layer, "_kernel", None) is not None:
            return layer._kernel.dequantized()
        return dequant_pack_quantized(layer.weight_packed, layer.weight_scale,
                                      getattr(layer, "weight_zero_point", None),
                                      (layer.out_per_partition, layer.in_per_partition), self.weights)


class IntLinearMethod(QuantizedLinearMethod):
    """int-quantized: int8 `weight` with per-channel (or group) scales (w8a8)."""

    def create_weights(self, layer: LinearBase) -> None:
        layer.register("weight", torch.zeros(layer.out_per_partition, layer.in_per_partition, dtype=torch.int8),
                       output_dim=0, input_dim=1)
        scale_shape, scale_in_dim = self._scale_shape(layer)
        layer.register("weight_scale", torch.ones(scale_shape, dtype=layer.params_dtype), output_dim=0,
                       input_dim=scale_in_dim)
        self._create_input_scale(layer)

    def kernel_weight(self, layer: LinearBase):
        return kl.int8_linear(layer.weight, layer.weight_scale, self.weights, self.input_activations)

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        if getattr(layer, "_kernel", None) is not None:
            return layer._kernel.dequantized()
        return dequant_int_quantized(layer.weight, layer.weight_scale, self.weights)


class Fp8BlockLinearMethod(QuantizedLinearMethod):
    """FP8 e4m3 weights with one float32 scale per (bo x bi) block: DeepSeek's native layout (`weight_scale_inv`)
    and compressed-tensors' float-quantized block strategy (`weight_scale`, FP8 per-token-group activations)."""

    def __init__(self, block_size: tuple[int, int] = (128, 128), scale_name: str = "weight_scale",
                 input_activations: QuantArgs | None = None):
        weights = QuantArgs(num_bits=8, type="float", strategy="block", block_structure=tuple(block_size))
        super().__init__(weights, input_activations)
        self.block_size = tuple(block_size)
        self.scale_name = scale_name

    def create_weights(self, layer: LinearBase) -> None:
        bo, bi = self.block_size
        sizes = layer.output_partition_sizes
        # each merged part has its own rows of block scales (q, k, v of 576, 192, 192 rows: 5 + 2 + 2)
        self.row_blocks = [-(-s // bo) for s in sizes]
        self.uneven = len(sizes) > 1 and any(s % bo for s in sizes)
        if self.uneven and layer.tp_size > 1:
            raise ValueError(f"{layer.prefix}: merged outputs {sizes} are not multiples of the fp8 block {bo}, "
                             f"which tensor parallelism needs")
        out_f, in_f = layer.out_per_partition, layer.in_per_partition
        layer.register("weight", torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn), output_dim=0, input_dim=1)
        layer.register(self.scale_name, torch.empty(sum(self.row_blocks), -(-in_f // bi), dtype=torch.float32),
                       output_dim=0, input_dim=1, weight_loader=self._part_scale_loader if self.uneven else None)
        self._create_input_scale(layer)

    def _part_scale_loader(self, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        start = sum(self.row_blocks[:shard_id])
        dst = param.data[start:start + self.row_blocks[shard_id]]
        if tuple(dst.shape) != tuple(loaded.shape):
            raise ValueError(f"block scales of shape {tuple(loaded.shape)} do not fit {tuple(dst.shape)}")
        dst.copy_(loaded)

    def kernel_weight(self, layer: LinearBase):
        # where block-scale rows restart at each merged part, each part runs as a product of its own
        return kl.fp8_block_linear(layer.weight, getattr(layer, self.scale_name), self.block_size,
                                   list(layer.output_partition_sizes) if self.uneven else None)

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        if getattr(layer, "_kernel", None) is not None:
            return layer._kernel.dequantized()
        scale = getattr(layer, self.scale_name)
        if not self.uneven:
            return dequant_float_quantized(layer.weight, scale, self.weights)
        parts, row, block = [], 0, 0
        for size, blocks in zip(layer.output_partition_sizes, self.row_blocks, strict=True):
            parts.append(dequant_float_quantized(layer.weight[row:row + size], scale[block:block + blocks],
                                                 self.weights))
            row, block = row + size, block + blocks
        return torch.cat(parts)

