"""Routed experts: each expert a gated MLP whose linears come from the quant method like any other layer.

Expert parallel gives each rank a contiguous share of the experts, whole; otherwise every expert is split across
the tensor-parallel ranks. Either way each rank adds up what its share computes for every token, and one all-reduce
combines the ranks. The torch path groups tokens by expert and runs each local expert that any token chose; it is
the CPU path and the reference for the fused MoE kernel.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.engine import parallel
from lowbit.layers.mlp import GatedMLP


class Experts(nn.ModuleDict):
    """This rank's experts, keyed by their global index, so parameters are named `experts.{e}.gate_up_proj...` as in
    checkpoints."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, quant_config=None,
                 prefix: str = "", params_dtype=None):
        expert_parallel = parallel.ep_size() > 1
        local = range(num_experts)
        if expert_parallel:
            ep, rank = parallel.ep_size(), parallel.ep_rank()
            if num_experts % ep:
                raise ValueError(f"{num_experts} experts do not divide among {ep} expert-parallel ranks")
            per = num_experts // ep
            local = range(rank * per, (rank + 1) * per)
        super().__init__({str(e): GatedMLP(hidden_size, intermediate_size, quant_config, f"{prefix}.{e}",
                                           params_dtype, tensor_parallel=not expert_parallel,
                                           reduce_results=False) for e in local})
        self.num_experts = num_experts
        self.expert_parallel = expert_parallel
        self.local = local
        self.reduce = expert_parallel or parallel.tp_size() > 1

    def __getitem__(self, e: int | str) -> GatedMLP:
        return super().__getitem__(str(e))

    def owns(self, e: int) -> bool:
        return e in self.local

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], topk_ids / topk_weights [T, K] -> sum_k weight_k * expert_k(x) [T, D], over all ranks."""
        T, K = topk_ids.shape
        flat = topk_ids.flatten()  # [T*K]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // K  # token index of each sorted (token, k) pair
        weights = topk_weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n and e in self.local:
                idx = order[start:start + n]
                tok = token_of[start:start + n]
                y = self[e](x[tok]) * weights[idx, None].to(x.dtype)
                out.index_add_(0, tok, y)
            start += n
        if self.reduce:
            out = parallel.all_reduce(out, expert=self.expert_parallel)
        return out
