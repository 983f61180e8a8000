import torch
from torch import nn

from lowbit.kernels.linear import kernels_enabled
from lowbit.kernels.norm_rope import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        # the kernel also quantizes its output to int8 per token (norm_rope.rms_norm): set at load time where layers
        # with int8 per-token activations run in the kernels (models/loader.py)
        self.int8_rows = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The norm of x; with a residual, (the norm of x + residual, x + residual): the decoder blocks' add and
        norm, one launch on the kernel path."""
        if x.is_cuda and kernels_enabled(x.device) and x.stride(-1) == 1 and (
                residual is None or residual.stride(-1) == 1):
            return rms_norm(x, self.weight, self.eps, residual, self.int8_rows)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
