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
from lowbit.kernels.linear import kernels_enabled
from lowbit.kernels.router import logits_kernel_fits, route, route_ref, router_logits
from lowbit.layers.mlp import GatedMLP


def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's logits x [T, D] @ weight [E, D].T in float32: one launch at decode sizes on the kernel path
    (kernels/router.py), the matrix library in float32 otherwise."""
    if kernels_enabled(x.device) and logits_kernel_fits(x, weight):
        return router_logits(x, weight)
    return torch.nn.functional.linear(x.float(), weight.float())


def select_experts(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, sigmoid: bool,
                   bias: torch.Tensor | None, normalize: bool, scaling: float,
                   shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The router after its logits [T, E]: (weights [T, K + shared] float32, expert ids [T, K + shared]), see
    kernels/router.py; one launch on a GPU, the torch reference elsewhere."""
    choose = route if logits.is_cuda and kernels_enabled(logits.device) else route_ref
    return choose(logits, top_k, n_group, topk_group, sigmoid, bias, normalize, scaling, shared)


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
        self.num_shared = 0  # shared experts run in the fused MoE (fuse_shared), set at load

    def __getitem__(self, e: int | str) -> GatedMLP:
        return super().__getitem__(str(e))

    def owns(self, e: int) -> bool:
        return e in self.local

    def fuse_shared(self, mlp: GatedMLP, n: int) -> None:
        """Offer a shared MLP n experts wide to the fused MoE, to run as n more experts (ids num_experts ..) in the
        same launches: its three matmuls, activation and sum were five launches per layer at batch-1 decode.
        Taken up in process_weights_after_loading where the weights allow it; `num_shared` says whether."""
        self.__dict__["_shared_mlp"] = (mlp, n)  # not a submodule: its parameters keep their own names

    def process_weights_after_loading(self) -> None:
        """On the kernel path, stack the local experts' weights for the fused MoE (one launch per projection for all
        experts); any expert whose weights no kernel covers keeps the whole layer on the torch path."""
        from lowbit.kernels.linear import split_shared, stack_experts
        self._fused = None
        self.num_shared = 0
        first = self[self.local[0]].down_proj
        device = next(iter(first.parameters())).device
        if not kernels_enabled(device):
            return

        def part(layer):  # a layer with an input transform stays on its own: the fused MoE would skip it
            return layer.kernel_part()
        gate_up = [part(self[e].gate_up_proj) for e in self.local]
        down = [part(self[e].down_proj) for e in self.local]
        if any(p is None for p in gate_up + down):
            return
        layers = [m for e in self.local for m in (self[e].gate_up_proj, self[e].down_proj)]
        mlp, n = self.__dict__.get("_shared_mlp", (None, 0))
        fused = None
        if mlp is not None and not self.expert_parallel:
            shared_parts = part(mlp.gate_up_proj), part(mlp.down_proj)
            pieces = split_shared(*shared_parts, n) if all(p is not None for p in shared_parts) else None
            if pieces is not None:  # one stack for routed and shared experts, where one configuration covers all
                fused = stack_experts(gate_up + pieces[0]), stack_experts(down + pieces[1])
                if any(f is None for f in fused):
                    fused = None
                else:
                    self.num_shared = n
                    layers += [mlp.gate_up_proj, mlp.down_proj]
        if fused is None:
            fused = stack_experts(gate_up), stack_experts(down)
            if any(f is None for f in fused):
                return
        self._fused = fused
        for layer in layers:  # the stacked copies are the weights from now on
            layer.release_weights()

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], topk_ids / topk_weights [T, K] -> sum_k weight_k * expert_k(x) [T, D], over all ranks (ids
        from num_experts on: the shared experts, where num_shared says they are fused)."""
        if getattr(self, "_fused", None) is not None:
            from lowbit.kernels.moe import fused_moe
            ids = topk_ids
            if self.expert_parallel:  # slots of other ranks' experts are skipped
                ids = torch.where((ids >= self.local.start) & (ids < self.local.stop), ids - self.local.start, -1)
            out = fused_moe(x.contiguous(), *self._fused, topk_weights, ids, may_skip=self.expert_parallel)
            return parallel.all_reduce(out, expert=self.expert_parallel) if self.reduce else out
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
