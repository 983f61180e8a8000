"""Linear layers that ask a quant method to create and apply their weights, tensor-parallel aware.

As in nano-vllm and vLLM: each layer knows its logical [out, in] size and its partition on this rank; the quant
method (one per scheme, `lowbit.quant.methods`) registers the parameters it needs (a bf16 `weight`, or
`weight_packed` + `weight_scale` + ...) through `layer.register()`, tagging which axis of each parameter follows
the layer's output or input features. The layer's `weight_loader` then slices any checkpoint tensor for this rank
from those tags alone, so a new scheme needs no new loading code, and merged layers (qkv, gate_up) place each
shard at its offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ConfigError
from lowbit.engine import parallel
from lowbit.quant.rotation import hadamard, is_power_of_two


@dataclass(frozen=True)
class InputTransform:
    """An online Hadamard transform of a layer's input that the checkpoint asks for (compressed-tensors'
    `transform_config`, location "input"): the scheme's name, which names the submodule holding its matrix
    (`{name}_input.weight`), and the block size (None: the layer's whole input)."""
    name: str
    block: int | None


class LinearMethod:
    """How one linear layer's weights are stored and multiplied. One subclass per scheme."""

    input_transform: InputTransform | None = None  # set by the quant config for the layers it transforms

    def create_weights(self, layer: "LinearBase") -> None:
        raise NotImplementedError

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        """x [T, in_per_partition] -> [T, out_per_partition], bias excluded."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        """Repack loaded tensors for the kernels that will read them (no-op by default)."""

    def dequantized_weight(self, layer: "LinearBase") -> torch.Tensor:
        """The weight this layer multiplies by, [out_per_partition, in_per_partition], in float32."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer):
        layer.register("weight", torch.empty(layer.out_per_partition, layer.in_per_partition, dtype=layer.params_dtype),
                       output_dim=0, input_dim=1)

    def apply(self, layer, x):
        return F.linear(x, layer.weight)

    def dequantized_weight(self, layer):
        return layer.weight.float()


class HadamardInput(nn.Module):
    """x [T, n] -> x blockdiag(H_B, ..., H_B) / sqrt(B): compressed-tensors' online "hadamard" input transform.

    `weight` is what the checkpoint stores, Sylvester's unnormalized +-1 matrix of order B (vLLM applies it with
    its hadacore kernel, which computes that matrix and no other); loading checks it is exactly that. The block
    must divide this rank's input features, so that each tensor-parallel shard of the input is whole blocks."""

    def __init__(self, block: int, features: int, prefix: str):
        super().__init__()
        if not is_power_of_two(block) or features % block:
            raise ConfigError(f"quantization_config.transform_config: {prefix}: the Hadamard block {block} of its "
                              f"input transform must be a power of two dividing its {features} input features "
                              f"(per tensor-parallel rank)")
        self.block = block
        self.weight = nn.Parameter(torch.empty(block, block, dtype=torch.float32), requires_grad=False)
        self.weight.weight_loader = self._load
        self.register_buffer("matrix", (hadamard(block) / math.sqrt(block)).to(torch.float32), persistent=False)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if tuple(loaded.shape) != (self.block, self.block) or not torch.equal(
                loaded.to(torch.float64).cpu(), hadamard(self.block)):
            raise ValueError(f"is not Sylvester's Hadamard matrix of order {self.block} (lowbit runs deterministic "
                             f"Hadamard transforms only)")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().unflatten(-1, (-1, self.block)) @ self.matrix  # [T, n/B, B]
        return y.flatten(-2).to(x.dtype)


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what}={a} is not divisible by the tensor-parallel size {b}")
    return a // b


class LinearBase(nn.Module):
    """A linear layer whose weights a LinearMethod owns.

    tp_dim: 0 shards the output features across tensor-parallel ranks (column parallel), 1 shards the input
    features (row parallel), None replicates. `output_sizes` lists the logical outputs merged in this layer
    (q, k, v; gate, up), each split across ranks on its own.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp_dim: int | None = None,
                 quant_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None,
                 prefix: str = "", reduce_results: bool = True):
        super().__init__()
        self.prefix = prefix
        self.reduce_results = reduce_results  # row parallel: sum the partial outputs here, or leave it to the caller
        self.tp_dim = tp_dim
        self.tp_size = parallel.tp_size() if tp_dim is not None else 1
        self.tp_rank = parallel.tp_rank() if tp_dim is not None else 0
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        if tp_dim == 0:
            self.output_partition_sizes = [_divide(s, self.tp_size, f"{prefix} output size") for s in output_sizes]
            self.in_per_partition = input_size
        elif tp_dim == 1:
            self.output_partition_sizes = list(output_sizes)
            self.in_per_partition = _divide(input_size, self.tp_size, f"{prefix} input size")
        else:
            self.output_partition_sizes = list(output_sizes)
            self.in_per_partition = input_size
        self.out_per_partition = sum(self.output_partition_sizes)
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self)
        self.input_transform = None
        t = self.quant_method.input_transform
        if t is not None:
            transform = HadamardInput(t.block or input_size, self.in_per_partition, prefix)
            self.add_module(f"{t.name}_input", transform)  # under the checkpoint's name: {prefix}.R4_input.weight
            self.__dict__["input_transform"] = transform  # the same module, not registered a second time
        if bias:
            # a row-parallel bias is added once, after the all-reduce, so it is not sharded
            assert reduce_results or tp_dim != 1, "a row-parallel bias needs the reduced output"
            self.register("bias", torch.zeros(self.out_per_partition, dtype=self.params_dtype),
                          output_dim=0 if tp_dim != 1 else None)
        else:
            self.bias = None

    # ------------------------------------------------------------------ parameters
    def register(self, name: str, tensor: torch.Tensor, output_dim: int | None = None, input_dim: int | None = None,
                 weight_loader: Callable | None = None) -> nn.Parameter:
        """Register a parameter; output_dim / input_dim name the axes that follow the layer's out / in features."""
        param = nn.Parameter(tensor, requires_grad=False)
        param.output_dim = output_dim
        param.input_dim = input_dim
        param.weight_loader = weight_loader or self.weight_loader
        self.register_parameter(name, param)
        return param

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        """Copy this rank's part of a checkpoint tensor into `param` (at shard `shard_id` of a merged layer)."""
        dst = param.data
        out_dim, in_dim = param.output_dim, param.input_dim
        if out_dim is not None:
            # the parameter's extent along out_dim relative to the features (1 for weights and per-channel
            # scales, 1/8 for zero points packed eight to an int32, ...)
            ratio = dst.shape[out_dim] / self.out_per_partition
            if shard_id is None:
                if len(self.output_sizes) > 1:
                    raise ValueError(f"{self.prefix}: merged layer needs a shard id to load {tuple(loaded.shape)}")
                shard_id = 0
            offset = round(sum(self.output_partition_sizes[:shard_id]) * ratio)
            size = round(self.output_partition_sizes[shard_id] * ratio)
            dst = dst.narrow(out_dim, offset, size)
            if self.tp_dim == 0 and self.tp_size > 1:
                loaded = loaded.narrow(out_dim, self.tp_rank * size, size)
        elif shard_id not in (None, 0) and dst.numel() == loaded.numel():
            pass  # a per-tensor value shared by every shard (e.g. a static input scale): the last one loaded wins
        if in_dim is not None and self.tp_dim == 1 and self.tp_size > 1:
            size = dst.shape[in_dim]
            loaded = loaded.narrow(in_dim, self.tp_rank * size, size)
        if tuple(dst.shape) != tuple(loaded.shape):
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit "
                             f"parameter of shape {tuple(dst.shape)}")
        dst.copy_(loaded)

    # ------------------------------------------------------------------ kernels
    def kernel_part(self):
        """This layer's weights as the GPU kernels take them (lowbit/kernels/linear.py): its quantized kernel
        weight, or its weight where it is unquantized; None where neither is (the torch path), or where an input
        transform comes before the product."""
        if self.input_transform is not None:
            return None
        kernel = getattr(self, "_kernel", None)
        if kernel is not None:
            return kernel
        return self.weight if isinstance(self.quant_method, UnquantizedLinearMethod) else None

    def release_weights(self) -> None:
        """A fused copy (stacked experts, a product of several layers) holds this layer's weights from now on: drop
        the layer's own."""
        self._kernel = None
        for p in self.parameters(recurse=False):
            p.data = p.data.new_empty(0)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)  # before apply: its activation quantization reads the turned input
        y = self.quant_method.apply(self, x)
        if self.tp_dim == 1 and self.tp_size > 1 and self.reduce_results:
            y = parallel.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_sizes}, tp_dim={self.tp_dim}, "
                f"method={type(self.quant_method).__name__}")


def fuse_same_input(layers: list[LinearBase]):
    """Layers that read the same input as one product of their stacked weights, on the kernel path, where each is
    whole on this rank, has no bias and their weights are of one kind (kernels/linear.py cat_products): the
    RowsProduct, which holds their weights from then on (x -> each layer's output), or None, the layers untouched."""
    from lowbit.kernels.linear import cat_products, kernels_enabled
    device = next(layers[0].parameters()).device
    if not kernels_enabled(device) or any(layer.tp_size > 1 or layer.bias is not None for layer in layers):
        return None
    parts = [layer.kernel_part() for layer in layers]
    fused = None if any(p is None for p in parts) else cat_products(parts)
    if fused is not None:
        for layer in layers:
            layer.release_weights()
    return fused


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kw):
        super().__init__(input_size, [output_size], bias=bias, tp_dim=None, **kw)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kw):
        super().__init__(input_size, [output_size], bias=bias, tp_dim=0, **kw)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs of the same input in one matmul (gate and up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, **kw):
        super().__init__(input_size, output_sizes, bias=bias, tp_dim=0, **kw)


class QKVParallelLinear(LinearBase):
    """q, k and v projections in one matmul; heads split across ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 **kw):
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias=bias, tp_dim=0, **kw)


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kw):
        super().__init__(input_size, [output_size], bias=bias, tp_dim=1, **kw)
