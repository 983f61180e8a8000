from __future__ import annotations

import torch
from torch import nn


class PreNormBlock(nn.Module):
    """A decoder layer: attention, then the MLP, each after an RMSNorm and each added to the running sum. Subclasses
    build self_attn, mlp, input_layernorm and post_attention_layernorm.

    forward returns (the MLP output, the running sum before it): their sum is the layer's output, and the next norm
    adds them (one launch with the norm on the kernel path)."""

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(positions, h), residual)
        return self.mlp(h), residual
