import torch
from torch import nn

from lowbit.layers.activation import silu_and_mul
from lowbit.layers.linear import LinearBase


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one matmul.

    tensor_parallel: gate/up column-parallel and down row-parallel across the tensor-parallel ranks (False: whole on
    this rank, as an expert-parallel expert is). reduce_results=False leaves the row-parallel sum to the caller."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant_config=None, prefix: str = "",
                 params_dtype=None, tensor_parallel: bool = True, reduce_results: bool = True):
        super().__init__()
        qm = quant_config.linear_method if quant_config is not None else (lambda p: None)
        self.gate_up_proj = LinearBase(hidden_size, [intermediate_size] * 2, tp_dim=0 if tensor_parallel else None,
                                       quant_method=qm(f"{prefix}.gate_up_proj"), params_dtype=params_dtype,
                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = LinearBase(intermediate_size, [hidden_size], tp_dim=1 if tensor_parallel else None,
                                    quant_method=qm(f"{prefix}.down_proj"), params_dtype=params_dtype,
                                    prefix=f"{prefix}.down_proj", reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
