"""Linear methods, one per scheme: which tensors a quantized layer holds and how it multiplies by them.

Each `apply` here is the torch reference path (CPU, and the oracle for the GPU kernels in `lowbit.kernels`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.layers.linear import LinearBase, LinearMethod


def fp8_block_dequant(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [out, in] fp8, scale [ceil(out/bo), ceil(in/bi)] -> w * scale per block, float32."""
    bo, bi = block
    out_f, in_f = w.shape
    s = scale.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return w.float() * s


class Fp8BlockLinearMethod(LinearMethod):
    """FP8 e4m3 weights with one float32 scale per (bo x bi) block (DeepSeek's native layout)."""

    def __init__(self, block_size: tuple[int, int] = (128, 128), scale_name: str = "weight_scale"):
        self.block_size = tuple(block_size)
        self.scale_name = scale_name

    def create_weights(self, layer: LinearBase) -> None:
        bo, bi = self.block_size
        for size in layer.output_partition_sizes:
            if size % bo and len(layer.output_partition_sizes) > 1:
                raise ValueError(f"{layer.prefix}: merged output {size} is not a multiple of the fp8 block {bo}")
        out_f, in_f = layer.out_per_partition, layer.in_per_partition
        layer.register("weight", torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn), output_dim=0, input_dim=1)
        layer.register(self.scale_name, torch.empty(-(-out_f // bo), -(-in_f // bi), dtype=torch.float32),
                       output_dim=0, input_dim=1)

    def dequantized_weight(self, layer: LinearBase) -> torch.Tensor:
        return fp8_block_dequant(layer.weight, getattr(layer, self.scale_name), self.block_size)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if layer.weight.device.type == "cpu":
            # the CPU has no fp8 matmul: keep a dequantized copy in the compute dtype for the reference path
            layer._dequant = self.dequantized_weight(layer).to(layer.params_dtype)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        w = getattr(layer, "_dequant", None)
        if w is None:
            w = self.dequantized_weight(layer).to(x.dtype)
        return F.linear(x, w)
