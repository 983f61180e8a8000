"""Where batch-1 decode time goes on one GPU: the kernels of a few decode steps of a V2-Lite-geometry model (random
weights, fewer layers), by GPU time, from torch.profiler, eager (each launch visible) and the wall time per token
with and without CUDA graphs.

    python benchmarks/profile_decode.py [--scheme bf16] [--layers 4] [--out DIR]
Prints the table and writes profile-decode-<scheme>.txt to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_random_checkpoint as mrc  # noqa: E402

from lowbit import LLM, SamplingParams  # noqa: E402


def per_token(llm, prompt, n) -> float:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate([prompt], params)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scheme", default="bf16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", default="/tmp/profile-decode")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    cfg = dict(mrc.GEOMETRIES["v2-lite"], num_hidden_layers=args.layers)
    path = os.path.join(args.work, f"v2-lite-{args.layers}l-{args.scheme}")
    if not os.path.exists(os.path.join(path, "config.json")):
        mrc.write(cfg, path, args.scheme, device="cuda", progress=False)
    prompt = list(range(10, 42))
    lines = [f"V2-Lite geometry, {args.layers} layers, {args.scheme}, batch 1, {torch.cuda.get_device_name()}"]
    graphed = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=512)
    wall = per_token(graphed, prompt, 64)
    gpu = graph_replay_time(graphed)
    lines.append(f"CUDA graphs: {wall * 1e3:.3f} ms per token; the batch-1 graph replayed back to back "
                 f"{gpu * 1e3:.3f} ms (GPU time of a step); the rest, {(wall - gpu) * 1e3:.3f} ms, is the host's "
                 "step (scheduling, inputs, the sampled token's read-back) with the GPU idle")
    del graphed
    torch.cuda.empty_cache()
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
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile-decode-{args.scheme}.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
