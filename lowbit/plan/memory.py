"""Memory arithmetic of a deployment: weight bytes under a recipe, KV-cache bytes per token, a workspace reserve,
and what one GPU holds under a tensor / expert / data / pipeline parallel layout.

Layouts follow lowbit's layers (and vLLM's): within a pipeline stage, tp ranks split attention, dense MLPs, shared
experts, embedding and head; with expert parallelism the routed experts are spread whole over all tp x dp ranks of
the stage, otherwise each expert is split by tp and copied to every dp replica. MLA's latent cache is one head, so
every tp rank holds the whole latent of its sequences; GQA's cache is split by kv head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lowbit.config import ModelConfig
from lowbit.plan.catalog import GIB, GPU
from lowbit.plan.inventory import EXPERT, KINDS, REPLICATED, TP, Tensor
from lowbit.quant.recipe import Recipe
from lowbit.quant.schemes import Scheme

KV_DTYPE_BYTES = {"bf16": 2, "fp8": 1}
RUNTIME_RESERVE = 1 * GIB  # per GPU, beyond activations: CUDA graphs, NCCL buffers, allocator slack


def scheme_of(t: Tensor, recipe: Recipe) -> Scheme | None:
    """The scheme the recipe gives a tensor; None when it stays unquantized (not a linear weight, or ignored)."""
    if not t.linear:
        return None
    # the MTP layer's shared head is an output head like lm_head: it is quantized exactly when lm_head is
    return recipe.scheme_for("lm_head" if t.kind == "lm_head" else t.module)


def tensor_bytes(t: Tensor, scheme: Scheme | None) -> int:
    """Bytes of one checkpoint tensor: a linear weight in its scheme (values, scales, zero points, static activation
    scale), anything else unquantized."""
    return t.numel * t.dtype_bytes if scheme is None else scheme.weight_bytes(*t.shape)


@dataclass
class Footprint:
    """A model's weights under a recipe, aggregated the ways a layout needs them."""
    cfg: ModelConfig
    bytes_by_kind: dict[str, dict[str, int]]  # {"main"|"mtp": {kind: bytes}}
    # stage unit -> {TP|REPLICATED|EXPERT: bytes}; units are "embed", decoder layer indices, "head"
    unit_bytes: dict[object, dict[str, int]]
    mtp_layers: list[int]  # checkpoint indices of the MTP layers included
    schemes: dict[str, Scheme]  # every scheme the recipe applied, by name
    kind_schemes: dict[str, list[str]]  # kind -> names of the schemes its tensors are in ("bf16" when unquantized)

    @property
    def total_bytes(self) -> int:
        return sum(sum(v.values()) for v in self.bytes_by_kind.values())

    @property
    def main_bytes(self) -> int:
        return sum(self.bytes_by_kind["main"].values())


def footprint(cfg: ModelConfig, tensors: list[Tensor], recipe: Recipe) -> Footprint:
    by_kind: dict[str, dict[str, int]] = {"main": {}, "mtp": {}}
    units: dict[object, dict[str, int]] = {}
    schemes: dict[str, Scheme] = {}
    kind_schemes: dict[str, set[str]] = {}
    for t in tensors:
        scheme = scheme_of(t, recipe)
        b = tensor_bytes(t, scheme)
        if scheme is not None:
            schemes[scheme.name] = scheme
        if t.linear:
            kind_schemes.setdefault(t.kind, set()).add("bf16" if scheme is None else scheme.name)
        part = by_kind["mtp" if t.mtp else "main"]
        part[t.kind] = part.get(t.kind, 0) + b
        unit = t.layer if t.layer is not None else ("embed" if t.kind == "embedding" else "head")
        u = units.setdefault(unit, {TP: 0, REPLICATED: 0, EXPERT: 0})
        u[t.shard] += b
    n = cfg.num_hidden_layers
    mtp_layers = sorted(u for u in units if isinstance(u, int) and u >= n)
    by_kind = {k: {kind: v[kind] for kind in KINDS if kind in v} for k, v in by_kind.items()}
    kinds = {k: sorted(kind_schemes.get(k, {"bf16"})) for k in KINDS if k in by_kind["main"] or k in by_kind["mtp"]}
    return Footprint(cfg, by_kind, units, mtp_layers, schemes, kinds)


def kv_bytes_per_token_per_layer(cfg: ModelConfig, kv_dtype: str, tp: int = 1) -> int:
    """KV-cache bytes one token takes in one attention layer on one tp rank."""
    b = KV_DTYPE_BYTES[kv_dtype]
    if cfg.is_deepseek:  # MLA: the compressed latent plus the shared rope key, the same on every tp rank
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b
    kv_heads = math.ceil(cfg.num_key_value_heads / tp)  # replicated when tp > kv heads
    return 2 * kv_heads * cfg.head_dim * b


def workspace_bytes(cfg: ModelConfig, tp: int, max_num_batched_tokens: int) -> int:
    """Per-GPU reserve for activations of one batch of `max_num_batched_tokens` tokens (residual, norms, q/k/v and
    attention out ~ 8 x hidden; the widest MLP: a dense layer's gate+up split by tp, or the routed experts' gate+up
    for top_k experts per token), in bf16, plus RUNTIME_RESERVE."""
    widest = cfg.intermediate_size // tp if cfg.intermediate_size else 0
    if cfg.n_routed_experts:
        widest = max(widest, cfg.num_experts_per_tok * cfg.moe_intermediate_size)
    per_token = 8 * cfg.hidden_size + 2 * widest
    return max_num_batched_tokens * per_token * 2 + RUNTIME_RESERVE


@dataclass(frozen=True, slots=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False  # expert parallel over tp x dp ranks

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def ep_size(self) -> int:
        return self.tp * self.dp if self.ep else 1

    def __str__(self) -> str:
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("dp", self.dp)) if v > 1]
        if self.ep:
            parts.append(f"ep{self.ep_size}")
        return " ".join(parts) or "tp1"

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep_size, "name": str(self)}


@dataclass
class LayoutPlan:
    layout: Layout
    weight_bytes_per_gpu: int  # the fullest GPU
    kv_bytes_per_token_per_gpu: int  # on the stage with the most KV per token
    workspace_bytes_per_gpu: int
    usable_bytes_per_gpu: int  # memory x gpu_memory_utilization
    tokens_per_replica: int  # tokens the KV cache of one data-parallel replica holds (the tightest stage decides)
    max_model_len: int

    @property
    def max_concurrent_tokens(self) -> int:
        return self.layout.dp * self.tokens_per_replica

    @property
    def kv_cache_bytes_per_gpu(self) -> int:
        return max(0, self.usable_bytes_per_gpu - self.weight_bytes_per_gpu - self.workspace_bytes_per_gpu)

    @property
    def fits(self) -> bool:
        return self.tokens_per_replica >= self.max_model_len

    @property
    def shortfall_bytes(self) -> int:
        """Per-GPU bytes missing to hold the weights, the workspace and one max_model_len sequence (0 if it fits)."""
        need = (self.weight_bytes_per_gpu + self.workspace_bytes_per_gpu
                + self.kv_bytes_per_token_per_gpu * self.max_model_len)
        return max(0, need - self.usable_bytes_per_gpu)

    def to_dict(self) -> dict:
        return {**self.layout.to_dict(), "fits": self.fits, "weight_bytes_per_gpu": self.weight_bytes_per_gpu,
                "workspace_bytes_per_gpu": self.workspace_bytes_per_gpu,
                "kv_cache_bytes_per_gpu": self.kv_cache_bytes_per_gpu,
                "kv_bytes_per_token_per_gpu": self.kv_bytes_per_token_per_gpu,
                "max_concurrent_tokens": self.max_concurrent_tokens,
                "max_concurrent_sequences": self.max_concurrent_tokens // self.max_model_len,
                "shortfall_bytes_per_gpu": self.shortfall_bytes}


@dataclass
class Budget:
    """What each GPU offers and what the deployment must hold besides weights."""
    gpu: GPU
    gpu_memory_utilization: float = 0.9
    kv_dtype: str = "bf16"
    max_model_len: int = 4096
    max_num_batched_tokens: int = 8192
    workspace_override: int | None = None  # bytes; None: workspace_bytes()
    gpus_per_node: int | None = None  # None: the GPU type's

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_DTYPE_BYTES)}, got {self.kv_dtype!r}")
        for name in ("max_model_len", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

    @property
    def node_size(self) -> int:
        return self.gpus_per_node or self.gpu.gpus_per_node

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu.memory_bytes * self.gpu_memory_utilization)


def _stages(fp: Footprint, pp: int) -> list[list[object]]:
    """Stage units for pp contiguous stages: the embedding first, the head and MTP layers last."""
    n = fp.cfg.num_hidden_layers
    sizes = [n // pp + (1 if s < n % pp else 0) for s in range(pp)]
    stages, start = [], 0
    for size in sizes:
        stages.append(list(range(start, start + size)))
        start += size
    stages[0].insert(0, "embed")
    stages[-1] += ["head", *fp.mtp_layers]
    return stages


def evaluate(fp: Footprint, layout: Layout, budget: Budget) -> LayoutPlan:
    cfg = fp.cfg
    E = cfg.n_routed_experts
    expert_share = math.ceil(E / layout.ep_size) / E if (layout.ep and E) else 1 / layout.tp
    kv_layer = kv_bytes_per_token_per_layer(cfg, budget.kv_dtype, layout.tp)
    workspace = (budget.workspace_override if budget.workspace_override is not None
                 else workspace_bytes(cfg, layout.tp, budget.max_num_batched_tokens))
    worst_weights, worst_kv, tokens = 0, 0, None
    for units in _stages(fp, layout.pp):
        w = 0
        for u in units:
            b = fp.unit_bytes.get(u)
            if b:
                w += math.ceil(b[TP] / layout.tp) + b[REPLICATED] + math.ceil(b[EXPERT] * expert_share)
        kv = kv_layer * sum(1 for u in units if isinstance(u, int))
        free = budget.usable_bytes - w - workspace
        t = max(0, free) // kv if kv else 0
        tokens = t if tokens is None else min(tokens, t)
        worst_weights, worst_kv = max(worst_weights, w), max(worst_kv, kv)
    return LayoutPlan(layout, worst_weights, worst_kv, workspace, budget.usable_bytes, tokens or 0,
                      budget.max_model_len)


def layouts_for(cfg: ModelConfig, gpus: int, node_size: int) -> list[Layout]:
    """Every layout of `gpus` GPUs lowbit can run: tp within a node and dividing the attention heads (and GQA's kv
    heads, or divided by them), pp no deeper than the layers, ep only for MoE models with enough experts."""
    out = []
    for tp in range(1, min(gpus, node_size) + 1):
        if gpus % tp or cfg.num_attention_heads % tp:
            continue
        kv = cfg.num_key_value_heads
        if not cfg.is_deepseek and kv % tp and tp % kv:
            continue
        for pp in range(1, gpus // tp + 1):
            if (gpus // tp) % pp or pp > cfg.num_hidden_layers:
                continue
            dp = gpus // (tp * pp)
            out.append(Layout(tp, pp, dp, False))
            if cfg.n_routed_experts and 1 < tp * dp <= cfg.n_routed_experts:
                out.append(Layout(tp, pp, dp, True))
    return out


OBJECTIVES = ("throughput", "latency")


def rank(plans: list[LayoutPlan], objective: str = "throughput") -> list[LayoutPlan]:
    """Best first: fitting layouts (the rest by how much they miss), then the shallowest pipeline; for throughput
    the most concurrent tokens, for latency the widest tensor parallelism; ties go to expert parallelism."""
    def key(p: LayoutPlan):
        lay = p.layout
        if objective == "latency":
            order = (-lay.tp, -p.max_concurrent_tokens)
        else:
            order = (-p.max_concurrent_tokens, -lay.tp)
        return (not p.fits, p.shortfall_bytes, lay.pp, *order, not lay.ep)
    return sorted(plans, key=key)


def candidate_gpu_counts(node_size: int, max_nodes: int = 64) -> list[int]:
    """GPU counts worth renting: powers of two up to a node, then whole nodes."""
    counts = [c for c in (1, 2, 4, 8, 16, 32, 64) if c < node_size]
    return counts + [node_size * k for k in range(1, max_nodes + 1)]


@dataclass
class Search:
    min_gpus: int | None
    best: LayoutPlan | None  # the best layout at min_gpus
    tried: list[int] = field(default_factory=list)


def fewest_gpus(fp: Footprint, budget: Budget, objective: str = "throughput") -> Search:
    tried = []
    for n in candidate_gpu_counts(budget.node_size):
        tried.append(n)
        plans = [evaluate(fp, lay, budget) for lay in layouts_for(fp.cfg, n, budget.node_size)]
        fitting = [p for p in plans if p.fits]
        if fitting:
            return Search(n, rank(fitting, objective)[0], tried)
    return Search(None, None, tried)
