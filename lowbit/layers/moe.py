"""Routed experts: each expert a gated MLP whose linears come from the quant method like any other layer.

The torch path groups tokens by expert and runs each expert that any token chose; it is the CPU path and the
reference for the fused MoE kernel.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.layers.mlp import GatedMLP


class Experts(nn.ModuleList):
    """Expert e is `self[e]`, so its parameters are named `experts.{e}.gate_up_proj...` as in checkpoints."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, quant_config=None,
                 prefix: str = "", params_dtype=None):
        super().__init__(GatedMLP(hidden_size, intermediate_size, quant_config, f"{prefix}.{e}", params_dtype)
                         for e in range(num_experts))
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], topk_ids / topk_weights [T, K] -> sum_k weight_k * expert_k(x) [T, D]."""
        T, K = topk_ids.shape
        flat = topk_ids.flatten()  # [T*K]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // K  # token index of each sorted (token, k) pair
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start:start + n]
            tok = token_of[start:start + n]
            y = self[e](x[tok]) * topk_weights.flatten()[idx, None].to(x.dtype)
            out.index_add_(0, tok, y)
            start += n
        return out
