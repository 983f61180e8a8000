"""Programmatic dependent launch and the MoE's experts asked of L2 by the router, in the batch-1 decode graph, every
scheme in one run.

For each scheme, a random checkpoint of the geometry at two depths (--layers, default 2 and 4): loaded once, its
batch-1 decode graph captured again under each variant MODE/PREFETCH (the PDL mode of lowbit/kernels/pdl.py: 0 off;
1 wait; 2 signal at the start, then wait; 3 wait, then signal; and which of the fused MoE's packed stacks the router
asks L2 for at one token, layers/moe.py L2_PREFETCH: none, all, gate_up, down), each graph replayed back to back after
a short generation (the median of five timings of 50 replays).
A MoE layer's time is the difference between the depths over the layers between them: the profiler's kernel
durations cannot split a replay by layer once kernels overlap (a kernel launched early counts its wait).

    python benchmarks/pdl_decode.py [--geometry v2-lite] [--layers 2,4] [--schemes bf16,w4a16,w4a8]
                                    [--variants 0/none,3/none,3/all]
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_random_checkpoint as mrc  # noqa: E402
from profile_decode import graph_replay_time  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit import LLM, SamplingParams  # noqa: E402
from lowbit.kernels import pdl  # noqa: E402
from lowbit.layers import moe as moe_layer  # noqa: E402

PROMPT = list(range(10, 42))


def recapture(llm) -> None:
    """The runner's decode graphs captured again (batch 1 only) under the current pdl.MODE."""
    from lowbit.engine.cuda_graphs import DecodeGraphs
    runner = llm.engine.runner
    old = runner.graphs
    runner.graphs = None
    del old
    gc.collect()
    torch.cuda.empty_cache()
    runner.graphs = DecodeGraphs(runner.model, [1], -(-runner.engine_cfg.max_model_len // runner.block_size),
                                 runner.block_size, runner.num_blocks, runner.device)


def measure(geometry: str, layers: int, scheme: str, variants: list[str], work: str) -> dict:
    cfg = dict(mrc.GEOMETRIES[geometry], num_hidden_layers=layers)
    path = os.path.join(work, f"{geometry}-{layers}l-{scheme}")
    if not os.path.exists(os.path.join(path, "config.json")):
        mrc.write(cfg, path, scheme, device="cuda", progress=False)
    llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=1, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    out = {}
    for v in variants:
        mode, prefetch = v.split("/")
        pdl.MODE, moe_layer.L2_PREFETCH = int(mode), prefetch
        recapture(llm)
        tokens = llm.generate([PROMPT], params)[0].token_ids  # the graph's inputs: a real step's, 96 tokens in
        times = [graph_replay_time(llm) * 1e6 for _ in range(5)]
        out[v] = {"graph_us": statistics.median(times), "spread_us": max(times) - min(times), "tokens": tokens}
        print(f"{scheme} {layers} layers, {v}: {out[v]['graph_us']:.1f} us (spread {out[v]['spread_us']:.1f})",
              flush=True)
    same = all(out[v]["tokens"] == out[variants[0]]["tokens"] for v in variants)
    for v in variants:
        del out[v]["tokens"]
    out["same_tokens"] = same
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    shutil.rmtree(path, ignore_errors=True)
    return out


def report(res: dict, geometry: str, depths: list[int], variants: list[str], device: str, out_dir: str) -> str:
    a, b = depths[0], depths[-1]
    L = [f"# Programmatic dependent launch and MoE L2 prefetch in the batch-1 decode graph, {geometry} widths, on "
         f"{device}", "",
         "Produced by `python benchmarks/pdl_decode.py`: per scheme and depth one load, the batch-1 decode graph "
         "captured again under each variant MODE/PREFETCH (PDL mode 0 off; 1 each kernel waits for the one before; "
         "2 it also signals at its start; 3 it signals after its wait. PREFETCH: which of the fused MoE's packed "
         "stacks the router asks L2 for at one token), replayed back to back (median of five timings of 50 "
         f"replays). MoE layer = (graph at {b} layers - graph at {a}) / {b - a}.", "",
         "| scheme | variant | " + " | ".join(f"graph, {d} layers (us)" for d in depths)
         + f" | vs {variants[0]}, {b} layers | MoE layer (us) | MoE layer vs bf16, same variant | greedy tokens as "
         f"{variants[0]} |",
         "| --- | --- | " + " | ".join("---" for _ in depths) + " | --- | --- | --- | --- |"]

    def layer(scheme, v):
        return (res[scheme][b][v]["graph_us"] - res[scheme][a][v]["graph_us"]) / (b - a)
    for scheme in res:
        for v in variants:
            moe = layer(scheme, v)
            vs0 = f"{res[scheme][b][variants[0]]['graph_us'] / res[scheme][b][v]['graph_us']:.3f}x"
            vsb = f"{layer('bf16', v) / moe:.2f}x" if "bf16" in res else "-"
            same = all(res[scheme][d]["same_tokens"] for d in depths)
            L.append(f"| {scheme} | {v} | " + " | ".join(f"{res[scheme][d][v]['graph_us']:.1f}" for d in depths)
                     + f" | {vs0} | {moe:.1f} | {vsb} | {'yes' if same else 'NO'} |")
    return write_results(out_dir, f"pdl-decode-{geometry}", device, L, res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="v2-lite", choices=sorted(mrc.GEOMETRIES))
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--schemes", default="bf16,w4a16,w4a8")
    ap.add_argument("--variants", default="0/none,3/none,3/all")
    ap.add_argument("--work", default="/tmp/pdl-decode")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    depths = [int(x) for x in args.layers.split(",")]
    variants = args.variants.split(",")
    assert len(depths) >= 2 and depths[0] < depths[-1], "two depths, the shallower first"
    res = {s: {d: measure(args.geometry, d, s, variants, args.work) for d in depths}
           for s in args.schemes.split(",")}
    path = report(res, args.geometry, depths, variants, torch.cuda.get_device_name(), args.out)
    print(open(path).read())


if __name__ == "__main__":
    main()
