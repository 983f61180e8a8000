"""The plan of one deployment: a model config, a recipe and a GPU type in; bytes, the fewest GPUs, the layout and
what the KV cache then holds out, with the warnings a deployment team would want before renting anything."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lowbit.config import ModelConfig
from lowbit.plan.catalog import GIB, GPU
from lowbit.plan.inventory import model_tensors, param_counts
from lowbit.plan.memory import (Budget, Footprint, LayoutPlan, evaluate, fewest_gpus, footprint,
                                kv_bytes_per_token_per_layer, layouts_for, rank)
from lowbit.quant.recipe import Recipe

# a scheme that needs FP8 tensor cores -> the one that runs on int8 tensor cores with the same weight bits
INT8_ALTERNATIVE = {"w4a8": "w4a8-int8", "fp8-block": "w8a8"}


@dataclass
class Plan:
    model: str
    cfg: ModelConfig
    recipe_label: str
    gpu: GPU
    budget: Budget
    params: dict[str, dict[str, int]]
    fp: Footprint
    kv_bytes_per_token: int
    min_gpus: int | None
    gpus: int | None  # the GPU count the layouts are for: --gpus x --nodes, else min_gpus
    chosen: LayoutPlan | None
    layouts: list[LayoutPlan]  # every layout of `gpus`, best first
    objective: str = "throughput"
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.chosen is not None and self.chosen.fits

    @property
    def total_params(self) -> int:
        return sum(sum(v.values()) for v in self.params.values())

    def serve_command(self, model: str = "CHECKPOINT") -> ServeCommand | None:
        """How to run this many GPUs with lowbit serve: the best of the layouts it runs (no pipeline parallel, no
        data-parallel attention yet), ranked as the plan ranks its layouts but by the tokens lowbit serve holds."""
        runnable = [p for p in self.layouts if p.layout.pp == 1]
        if not runnable:
            return None
        def key(p: LayoutPlan):
            order = (-p.layout.tp, -served_tokens(p)) if self.objective == "latency" else (-served_tokens(p),
                                                                                          -p.layout.tp)
            return (not p.fits, p.shortfall_bytes, *order, not p.layout.ep)
        return serve_command(min(runnable, key=key), self.budget, model)

    def to_dict(self) -> dict:
        c = self.chosen
        serve = self.serve_command()
        return {
            "model": self.model, "model_type": self.cfg.model_type, "recipe": self.recipe_label,
            "schemes_by_kind": self.fp.kind_schemes,
            "gpu": {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes, "fp8": self.gpu.fp8},
            "params": {"main": sum(self.params["main"].values()), "mtp": sum(self.params["mtp"].values()),
                       "total": self.total_params, "by_kind": self.params},
            "weight_bytes": self.fp.total_bytes, "weight_bytes_main": self.fp.main_bytes,
            "weight_bytes_mtp": self.fp.total_bytes - self.fp.main_bytes, "weight_bytes_by_kind": self.fp.bytes_by_kind,
            "kv_cache_dtype": self.budget.kv_dtype, "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_model_len": self.budget.max_model_len, "gpu_memory_utilization": self.budget.gpu_memory_utilization,
            "min_gpus": self.min_gpus, "gpus": self.gpus, "gpus_per_node": self.budget.node_size, "fits": self.fits,
            "per_gpu_bytes": None if c is None else c.weight_bytes_per_gpu + c.workspace_bytes_per_gpu,
            "per_gpu": None if c is None else {
                "weights": c.weight_bytes_per_gpu, "workspace": c.workspace_bytes_per_gpu,
                "kv_cache": c.kv_cache_bytes_per_gpu, "usable": c.usable_bytes_per_gpu},
            "max_concurrent_tokens": 0 if c is None else c.max_concurrent_tokens,
            "layout": None if c is None else c.layout.to_dict(), "objective": self.objective,
            "layouts": [p.to_dict() for p in self.layouts],
            "serve": None if serve is None else {"layout": serve.layout, "fits": serve.fits, "command": serve.command,
                                                 "max_concurrent_tokens": serve.max_concurrent_tokens,
                                                 "note": serve.note},
            "warnings": self.warnings, "notes": self.notes,
        }


@dataclass
class ServeCommand:
    layout: str  # the layout it runs
    fits: bool
    max_concurrent_tokens: int  # what lowbit serve holds in that layout (see served_tokens)
    command: str  # torchrun + lowbit serve (plain lowbit serve on one GPU)
    note: str | None = None  # how the run differs from the planned layout


def served_tokens(p: LayoutPlan) -> int:
    """Concurrent tokens under lowbit serve, which has no data-parallel attention yet: the dp groups of an
    expert-parallel layout repeat one batch (dp replicas without ep are separate servers, as planned)."""
    return p.tokens_per_replica if p.layout.ep and p.layout.dp > 1 else p.max_concurrent_tokens


def serve_command(p: LayoutPlan, budget: Budget, model: str = "CHECKPOINT") -> ServeCommand:
    """The lowbit serve flags for a layout without pipeline parallel: --tensor-parallel-size tp (tp consecutive
    ranks, one node's GPUs at most) and --expert-parallel over all tp x dp ranks, launched by torchrun across the
    nodes it spans."""
    lay = p.layout
    assert lay.pp == 1, "lowbit serve has no pipeline parallel"
    notes = []
    world = lay.tp * lay.dp if lay.ep else lay.tp
    if lay.dp > 1 and lay.ep:
        notes.append(f"no data-parallel attention yet: the {lay.dp} groups of {lay.tp} ranks repeat one batch")
    elif lay.dp > 1:
        notes.append(f"{lay.dp} replicas: run this on each {lay.tp} GPUs, behind one load balancer")
    if budget.kv_dtype != "bf16":
        notes.append(f"lowbit serve keeps the KV cache in the model dtype, not {budget.kv_dtype}")
    flags = f"--model {model}"
    if lay.tp > 1:
        flags += f" --tensor-parallel-size {lay.tp}"
    if lay.ep:
        flags += " --expert-parallel"
    flags += f" --max-model-len {p.max_model_len} --kv-cache-memory-gb {max(0.1, p.kv_cache_bytes_per_gpu / GIB):.1f}"
    if world == 1:
        command = f"lowbit serve {flags}"
    elif world <= budget.node_size:
        command = f"torchrun --nproc-per-node {world} -m lowbit serve {flags}"
    else:
        command = (f"torchrun --nnodes {world // budget.node_size} --nproc-per-node {budget.node_size} "
                   f"--rdzv-backend c10d --rdzv-endpoint HEAD_NODE:29500 -m lowbit serve {flags}")
    return ServeCommand(str(lay), p.fits, served_tokens(p), command, "; ".join(notes) or None)


def make_plan(model: str, cfg: ModelConfig, recipe: Recipe, recipe_label: str, budget: Budget,
              gpus: int | None = None, include_mtp: bool = True, objective: str = "throughput") -> Plan:
    """Plan `cfg` under `recipe` on budget.gpu: on `gpus` GPUs when given, else on the fewest that fit."""
    tensors = model_tensors(cfg, include_mtp=include_mtp)
    fp = footprint(cfg, tensors, recipe)
    attn_layers = cfg.num_hidden_layers + len(fp.mtp_layers)
    kv_per_token = attn_layers * kv_bytes_per_token_per_layer(cfg, budget.kv_dtype)
    search = fewest_gpus(fp, budget, objective)
    n = gpus if gpus is not None else search.min_gpus
    layouts: list[LayoutPlan] = []
    if n is not None:
        layouts = rank([evaluate(fp, lay, budget) for lay in layouts_for(cfg, n, budget.node_size)], objective)
        if not layouts:
            raise ValueError(f"no layout of {n} GPUs suits this model (tensor parallelism must divide its "
                             f"{cfg.num_attention_heads} attention heads; nodes of {budget.node_size})")
    plan = Plan(model, cfg, recipe_label, budget.gpu, budget, param_counts(tensors), fp, kv_per_token,
                search.min_gpus, n, layouts[0] if layouts else None, layouts, objective)
    _advise(plan, gpus is not None)
    return plan


def _advise(plan: Plan, gpus_given: bool) -> None:
    gpu, cfg, b = plan.gpu, plan.cfg, plan.budget
    for scheme in plan.fp.schemes.values():
        if scheme.needs_fp8 and not gpu.fp8:
            alt = INT8_ALTERNATIVE.get(scheme.name)
            plan.warnings.append(
                f"{gpu.name} has no FP8 tensor cores, which {scheme.name} needs"
                + (f": use {alt} instead ({alt}: {_description(alt)})" if alt else ""))
    if b.max_model_len > cfg.max_position_embeddings:
        plan.warnings.append(f"--max-model-len {b.max_model_len} is longer than the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
    if plan.min_gpus is None:
        plan.warnings.append(f"does not fit on any count of {gpu.name} tried (up to {64 * b.node_size})")
    c = plan.chosen
    if gpus_given and c is not None and not c.fits:
        need = c.weight_bytes_per_gpu + c.workspace_bytes_per_gpu + c.kv_bytes_per_token_per_gpu * b.max_model_len
        plan.warnings.append(
            f"does not fit {plan.gpus} x {gpu.name}: even the best layout ({c.layout}) needs {need / 2**30:.1f} GiB "
            f"per GPU (weights {c.weight_bytes_per_gpu / 2**30:.1f}, workspace {c.workspace_bytes_per_gpu / 2**30:.1f},"
            f" KV for one {b.max_model_len}-token sequence {c.kv_bytes_per_token_per_gpu * b.max_model_len / 2**30:.1f})"
            f" and {c.usable_bytes_per_gpu / 2**30:.1f} GiB is usable"
            + (f"; the fewest that fit: {plan.min_gpus}" if plan.min_gpus else ""))
    int8 = [s for s in plan.fp.schemes.values() if s.weights.type == "int" and s.weights.num_bits == 8]
    if int8:
        main = sum(plan.params["main"].values())
        plan.notes.append(
            f"{int8[0].name} stores one byte per weight: {main / 1e9:.0f}B parameters are about {main / 1e9:.0f} GB "
            f"in INT8, not the {math.floor(main / 2e9)} GB some guides quote (that is 4 bits per parameter)")
    if plan.fp.mtp_layers:
        mtp = sum(plan.params["mtp"].values())
        plan.notes.append(f"includes the MTP layer for speculative decoding ({mtp / 1e9:.2f}B parameters, "
                          f"{(plan.fp.total_bytes - plan.fp.main_bytes) / 1e9:.1f} GB, and its KV); --no-mtp leaves "
                          f"it out")


def _description(scheme_name: str) -> str:
    from lowbit.quant.schemes import get_scheme
    return get_scheme(scheme_name).description
