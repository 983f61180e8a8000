"""Where batch-1 decode time goes on one GPU: the kernels of a few decode steps of a V2-Lite-geometry model (random
weights, fewer layers), by GPU time, from torch.profiler: eager (each launch visible) and the batch-1 decode graph's
replays (by kernel, and one replay in launch order); and the wall time per decode token with CUDA graphs, steps one at
a time and launched ahead of the host (EngineConfig.async_decode), and eager.

    python benchmarks/profile_decode.py [--scheme bf16] [--layers 4] [--geometry v2-lite] [--graph-only] [--out DIR]
Prints the table and writes profile-decode-<scheme>.txt (r1: profile-decode-r1-<scheme>.txt) to --out. --geometry r1
takes DeepSeek-R1's widths (the first layer dense, the others MoE); --graph-only skips the step-at-a-time and eager
runs (each loads the model again: minutes at R1's width). Programmatic dependent launch is off here (LOWBIT_PDL=0):
under it kernels overlap and a kernel's duration counts its wait.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_random_checkpoint as mrc  # noqa: E402

from lowbit import LLM, SamplingParams  # noqa: E402
from lowbit.kernels import pdl  # noqa: E402


def per_token(llm, prompt, n) -> float:
    """Seconds per decode step at batch 1: the decode steps of n + 1 tokens alone, the prefill stepped through first
    (e2e.decode_rate: a generation less a one-token one carried the host-bound prefill's spread), the best of two."""
    from e2e import decode_rate
    return 1.0 / max(decode_rate(llm, [prompt], n + 1) for _ in range(2))


def graph_replay_time(llm, reps: int = 50) -> float:
    """Seconds per replay of the batch-1 decode graph, back to back with no host work between (the inputs the last
    step left)."""
    graph = llm.engine.runner.graphs.graphs[1]
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e-3 / reps


def decode_kernels(llm, reps: int = 20) -> list[str]:
    """GPU time per decode step by kernel, from replays of the batch-1 decode graph (what a served step runs, with
    no prefill in it; the inputs a generation left): torch.profiler sees the kernels inside a graph."""
    graph = llm.engine.runner.graphs.graphs[1]
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / reps, e.count / reps) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    out = [f"decode graph, batch 1, by kernel ({reps} replays): {sum(r[2] for r in rows):.0f} kernels, "
           f"{total:.1f} us GPU time per step",
           f"{'kernel':70s} {'us/step':>9s} {'launches':>9s} {'us each':>8s}"]
    out += [f"{k[:70]:70s} {t:9.1f} {n:9.1f} {t / n:8.2f}" for k, t, n in rows]
    out.append("one replay in launch order: start (us from the first), kernel, GPU us")
    out += [f"{start:9.1f}  {name[:60]:60s} {us:8.2f}" for start, name, us in replay_order(llm)]
    return out


def replay_order(llm) -> list[tuple[float, str, float]]:
    """One replay of the batch-1 decode graph: (start in us from the first kernel, kernel name, GPU us) in launch
    order."""
    graph = llm.engine.runner.graphs.graphs[1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if str(e.device_type).endswith("CUDA")),
                     key=lambda e: e.time_range.start)
    t0 = kernels[0].time_range.start if kernels else 0
    return [(e.time_range.start - t0, e.name, e.time_range.end - e.time_range.start) for e in kernels]


def by_layer(order: list[tuple[float, str, float]], layers: int) -> dict:
    """A replay's GPU time split by decoder layer: every layer launches the same number of RMSNorms (input,
    post-attention, and q_a's norm with q LoRA) and the final norm one more, so layer i starts at its first RMSNorm
    and the head at the last one; each layer must then hold one paged attention decode. Returns {"before": kernels
    ahead of the first layer (embedding), "layers": [us per layer], "head": the final norm, the head and sampling};
    the per-step rope table and position kernels fall in the first layer."""
    norms = [i for i, (_, name, _) in enumerate(order) if name == "_rms_norm_kernel"]
    per = (len(norms) - 1) // layers
    assert per * layers + 1 == len(norms), f"{len(norms)} RMSNorm launches for {layers} layers"
    bounds = [norms[i * per] for i in range(layers)] + [norms[-1], len(order)]
    for i in range(layers):
        attention = [name for _, name, _ in order[bounds[i]:bounds[i + 1]] if name.endswith("a_decode_kernel")]
        assert len(attention) == 1, f"layer {i}: {len(attention)} attention decodes between its RMSNorms"

    def span(a, b):
        return sum(us for _, _, us in order[a:b])
    return {"before": span(0, bounds[0]), "layers": [span(bounds[i], bounds[i + 1]) for i in range(layers)],
            "head": span(bounds[layers], len(order))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scheme", default="bf16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", default="/tmp/profile-decode")
    ap.add_argument("--out", default=".")
    ap.add_argument("--geometry", default="v2-lite", choices=["v2-lite", "r1"])
    ap.add_argument("--graph-only", action="store_true")
    args = ap.parse_args()
    # kernel durations must not overlap for the tables below: a kernel that programmatic dependent launch placed
    # early counts its wait (benchmarks/pdl_decode.py measures what PDL changes)
    pdl.MODE = 0
    cfg = dict(mrc.GEOMETRIES[args.geometry], num_hidden_layers=args.layers)
    path = os.path.join(args.work, f"{args.geometry}-{args.layers}l-{args.scheme}")
    if not os.path.exists(os.path.join(path, "config.json")):
        mrc.write(cfg, path, args.scheme, device="cuda", progress=False)
    prompt = list(range(10, 42))
    name = "V2-Lite" if args.geometry == "v2-lite" else "DeepSeek-R1"
    lines = [f"{name} geometry, {args.layers} layers, {args.scheme}, batch 1, {torch.cuda.get_device_name()}"]
    for async_decode in ((True,) if args.graph_only else (False, True)):
        graphed = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=512,
                      async_decode=async_decode)
        wall = per_token(graphed, prompt, 64)
        gpu = graph_replay_time(graphed)
        how = "each step launched ahead of the host (async_decode)" if async_decode else "one step at a time"
        lines.append(f"CUDA graphs, {how}: {wall * 1e3:.3f} ms per token; the batch-1 graph replayed back to back "
                     f"{gpu * 1e3:.3f} ms (GPU time of a step); the rest, {(wall - gpu) * 1e3:.3f} ms, is time the "
                     "GPU waits for the host (scheduling, inputs, the sampled token's read-back)")
        if async_decode:
            kernel_lines = decode_kernels(graphed)
        del graphed
        torch.cuda.empty_cache()
    suffix = args.scheme if args.geometry == "v2-lite" else f"r1-{args.scheme}"
    if args.graph_only:
        write_text(lines + kernel_lines, args.out, suffix)
        return
    eager = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=512, enforce_eager=True)
    lines.append(f"eager: {per_token(eager, prompt, 64) * 1e3:.3f} ms per token")
    steps = 16
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager.generate([prompt], params)
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events if e.self_device_time_total > 0)
    lines.append(f"{steps} steps (one prefill): {launches} kernel launches, {launches / steps:.0f} per token, "
                 f"GPU busy {total / steps / 1e3:.3f} ms per token")
    lines.append(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
    write_text(lines + kernel_lines, args.out, suffix)


def write_text(lines: list[str], out: str, suffix: str) -> None:
    text = "\n".join(lines)
    print(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"profile-decode-{suffix}.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
