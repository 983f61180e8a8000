"""`lowbit plan`: size a deployment before renting it."""
from __future__ import annotations

import argparse
import json
import os

from lowbit.plan.catalog import GIB, builtin_models, gpu_types, load_model_config, resolve_gpu
from lowbit.plan.memory import KV_DTYPE_BYTES, OBJECTIVES, Budget
from lowbit.plan.planner import Plan, make_plan
from lowbit.quant.recipe import Recipe
from lowbit.quant.schemes import SCHEMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="a config.json, a checkpoint folder, a GGUF file, or a built-in name "
                        f"({', '.join(builtin_models())}); default: the embedded default model")
    p.add_argument("--scheme", choices=list(SCHEMES), help="every linear layer in this scheme (default: bf16)")
    p.add_argument("--recipe", help="a recipe file (JSON/YAML): schemes per module, e.g. w4a8 experts + fp8-block "
                                    "attention; overrides --scheme")
    p.add_argument("--gpu", help=f"GPU type: {', '.join(gpu_types())}")
    p.add_argument("--gpu-memory", type=float, metavar="GiB", help="any other GPU: its memory in GiB")
    p.add_argument("--gpu-fp8", action="store_true", help="with --gpu-memory: the GPU has FP8 tensor cores")
    p.add_argument("--gpus", type=int, help="GPUs per node to plan for (default: find the fewest that fit)")
    p.add_argument("--nodes", type=int, help="nodes of --gpus GPUs each (default 1; without --gpus, nodes of the "
                                             "GPU type's usual size, 8)")
    p.add_argument("--max-model-len", type=int,
                   help="longest sequence one request may have; one must fit (default: the model's context length)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of each GPU's memory the server may take (default 0.9)")
    p.add_argument("--kv-cache-dtype", choices=list(KV_DTYPE_BYTES), default="bf16")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="tokens in one forward pass; sizes the activation workspace (default 8192)")
    p.add_argument("--workspace-gib", type=float, help="per-GPU workspace reserve instead of the estimate")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer (no speculative decoding)")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="which layout to recommend: the most concurrent tokens, or the widest tensor parallelism")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def run(args: argparse.Namespace) -> int:
    name, cfg = load_model_config(args.model)
    if args.recipe:
        recipe, label = Recipe.load(args.recipe), args.recipe
    else:
        label = args.scheme or "bf16"
        recipe = Recipe.from_scheme(label)
    gpu = resolve_gpu(args.gpu, args.gpu_memory, True if args.gpu_fp8 else None)
    for flag, v in (("--gpus", args.gpus), ("--nodes", args.nodes)):
        if v is not None and v <= 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
    per_node = args.gpus if args.gpus is not None or args.nodes is None else gpu.gpus_per_node
    budget = Budget(gpu, args.gpu_memory_utilization, args.kv_cache_dtype,
                    args.max_model_len or cfg.max_position_embeddings, args.max_num_batched_tokens,
                    None if args.workspace_gib is None else int(args.workspace_gib * GIB), per_node)
    total = None if per_node is None else per_node * (args.nodes or 1)
    plan = make_plan(name, cfg, recipe, label, budget, total, include_mtp=not args.no_mtp,
                     objective=args.objective)
    checkpoint = args.model if os.path.isdir(args.model) or args.model.endswith(".gguf") else "CHECKPOINT"
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan, checkpoint))
    return 0


def _b(n: float) -> str:
    return "-" if n == 0 else f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _p(n: int) -> str:
    return "-" if n == 0 else f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: Plan, checkpoint: str = "CHECKPOINT") -> str:
    cfg, fp, b, gpu = plan.cfg, plan.fp, plan.budget, plan.gpu
    out = [f"{plan.model} ({cfg.model_type}) in {plan.recipe_label} on {gpu.name} "
           f"({_gib(gpu.memory_bytes)} GiB, FP8 {'yes' if gpu.fp8 else 'no'})", ""]
    has_mtp = bool(fp.mtp_layers)
    out.append(f"  {'module':<16}{'scheme':<22}{'params':>10}{'bytes':>11}"
               + (f"{'MTP params':>13}{'MTP bytes':>11}" if has_mtp else ""))
    for kind, schemes in fp.kind_schemes.items():
        row = (f"  {kind:<16}{', '.join(schemes):<22}{_p(plan.params['main'].get(kind, 0)):>10}"
               f"{_b(fp.bytes_by_kind['main'].get(kind, 0)):>11}")
        if has_mtp:
            row += f"{_p(plan.params['mtp'].get(kind, 0)):>13}{_b(fp.bytes_by_kind['mtp'].get(kind, 0)):>11}"
        out.append(row)
    main_p, mtp_p = sum(plan.params["main"].values()), sum(plan.params["mtp"].values())
    row = f"  {'total':<38}{_p(main_p):>10}{_b(fp.main_bytes):>11}"
    if has_mtp:
        row += f"{_p(mtp_p):>13}{_b(fp.total_bytes - fp.main_bytes):>11}"
    out += [row, ""]
    out.append(f"weights         {_b(fp.total_bytes)} ({_gib(fp.total_bytes)} GiB), {_p(plan.total_params)} parameters")
    layers = f"{cfg.num_hidden_layers} layers" + (f" + {len(fp.mtp_layers)} MTP" if fp.mtp_layers else "")
    shape = (f"MLA ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim})" if cfg.is_deepseek
             else f"GQA 2 x {cfg.num_key_value_heads} x {cfg.head_dim}")
    out.append(f"KV cache        {plan.kv_bytes_per_token:,} bytes per token: {shape} x ({layers}) "
               f"x {KV_DTYPE_BYTES[b.kv_dtype]} ({b.kv_dtype})")
    out.append(f"budget          {b.gpu_memory_utilization:g} of each GPU usable ({_gib(b.usable_bytes)} GiB), "
               f"one {b.max_model_len}-token sequence must fit")
    if plan.min_gpus is None:
        out.append(f"fewest GPUs     none: does not fit on up to {64 * b.node_size} x {gpu.name}")
    else:
        out.append(f"fewest GPUs     {plan.min_gpus} x {gpu.name}")
    c = plan.chosen
    if c is not None:
        if c.fits:
            out.append(f"on {plan.gpus} x {gpu.name}: fits; recommended layout {c.layout} "
                       f"({c.max_concurrent_tokens:,} concurrent tokens = {c.max_concurrent_tokens // b.max_model_len:,}"
                       f" sequences of {b.max_model_len}; ranked for {plan.objective})")
        else:
            out.append(f"on {plan.gpus} x {gpu.name}: does NOT fit; closest layout {c.layout} "
                       f"(short by {_gib(c.shortfall_bytes)} GiB per GPU)")
        out += ["", f"  {'layout':<20}{'weights/GPU':>12}{'workspace':>11}{'KV space':>10}{'KV/token/GPU':>14}"
                    f"{'concurrent tokens':>19}  fits", f"  {'':<20}{'GiB':>12}{'GiB':>11}{'GiB':>10}{'bytes':>14}"]
        for p in plan.layouts[:12]:
            out.append(f"  {str(p.layout):<20}{_gib(p.weight_bytes_per_gpu):>12}{_gib(p.workspace_bytes_per_gpu):>11}"
                       f"{_gib(p.kv_cache_bytes_per_gpu):>10}{p.kv_bytes_per_token_per_gpu:>14,}"
                       f"{p.max_concurrent_tokens:>19,}  {'yes' if p.fits else 'no'}")
        if len(plan.layouts) > 12:
            out.append(f"  ... {len(plan.layouts) - 12} more (--json lists all)")
        serve = plan.serve_command(checkpoint)
        if serve is not None and serve.fits:
            head = ("serve it:" if serve.layout == str(c.layout) else
                    f"lowbit serve runs {serve.layout} best here ({serve.max_concurrent_tokens:,} concurrent tokens; "
                    f"it has no pipeline parallel or data-parallel attention yet):")
            out += ["", head, f"  {serve.command}"]
            out += [f"  ({serve.note})"] if serve.note else []
        else:
            out += ["", ("lowbit serve: none of the layouts it runs (no pipeline parallel or data-parallel "
                         "attention yet) fits")]
    if plan.warnings or plan.notes:
        out.append("")
    out += [f"warning: {w}" for w in plan.warnings] + [f"note: {n}" for n in plan.notes]
    return "\n".join(out)
