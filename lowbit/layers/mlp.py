import torch
from torch import nn

from lowbit.layers.activation import silu_and_mul
from lowbit.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one column-parallel matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, quant_config=None, prefix: str = "",
                 params_dtype=None):
        super().__init__()
        qm = quant_config.linear_method if quant_config is not None else (lambda p: None)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       quant_method=qm(f"{prefix}.gate_up_proj"),
                                                       params_dtype=params_dtype, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, quant_method=qm(f"{prefix}.down_proj"),
                                           params_dtype=params_dtype, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
