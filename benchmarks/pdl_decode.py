"""Programmatic dependent launch in the batch-1 decode graph, off and on, every scheme in one run.

For each scheme, a random checkpoint of the geometry at two depths (--layers, default 2 and 4): loaded once, its
batch-1 decode graph captured again under each PDL mode (lowbit/kernels/pdl.py: 0 off; 1 wait; 2 signal at the
start, then wait; 3 wait, then signal), each graph replayed back to back after a short generation (the median of five
timings of 50 replays).
A MoE layer's time is the difference between the depths over the layers between them: the profiler's kernel
durations cannot split a replay by layer once kernels overlap (a kernel launched early counts its wait).

    python benchmarks/pdl_decode.py [--geometry v2-lite] [--layers 2,4] [--schemes bf16,w4a16,w4a8] [--modes 0,1,2,3]
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

PROMPT = list(range(10, 42))


def measure(geometry: str, layers: int, scheme: str, modes: list[int], work: str) -> dict:
    cfg = dict(mrc.GEOMETRIES[geometry], num_hidden_layers=layers)
    path = os.path.join(work, f"{geometry}-{layers}l-{scheme}")
    if not os.path.exists(os.path.join(path, "config.json")):
        mrc.write(cfg, path, scheme, device="cuda", progress=False)
    llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=1, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    out = {}
    for mode in modes:
        pdl.MODE = mode
        llm.engine.runner.capture_graphs([1])  # batch 1 only, under the mode just set
        tokens = llm.generate([PROMPT], params)[0].token_ids  # the graph's inputs: a real step's, 96 tokens in
        times = [graph_replay_time(llm) * 1e6 for _ in range(5)]
        out[mode] = {"graph_us": statistics.median(times), "spread_us": max(times) - min(times), "tokens": tokens}
        print(f"{scheme} {layers} layers, PDL mode {mode}: {out[mode]['graph_us']:.1f} us "
              f"(spread {out[mode]['spread_us']:.1f})", flush=True)
    same = all(out[m]["tokens"] == out[modes[0]]["tokens"] for m in modes)
    for m in modes:
        del out[m]["tokens"]
    out["same_tokens"] = same
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    shutil.rmtree(path, ignore_errors=True)
    return out


def report(res: dict, geometry: str, depths: list[int], modes: list[int], device: str, out_dir: str) -> str:
    a, b = depths[0], depths[-1]
    L = [f"# Programmatic dependent launch in the batch-1 decode graph, {geometry} widths, on {device}", "",
         "Produced by `python benchmarks/pdl_decode.py`: per scheme and depth one load, the batch-1 decode graph "
         "captured again under each PDL mode (0 off; 1 each kernel waits for the one before; 2 it also signals at "
         "its start; 3 it signals after its wait), replayed back to back (median of five timings of 50 replays). "
         f"MoE layer = (graph at {b} layers - graph at {a}) / {b - a}.", "",
         "| scheme | mode | " + " | ".join(f"graph, {d} layers (us)" for d in depths)
         + " | MoE layer (us) | MoE layer vs mode 0 | MoE layer vs bf16, same mode | greedy tokens as mode 0 |",
         "| --- | --- | " + " | ".join("---" for _ in depths) + " | --- | --- | --- | --- |"]

    def layer(scheme, mode):
        return (res[scheme][b][mode]["graph_us"] - res[scheme][a][mode]["graph_us"]) / (b - a)
    for scheme in res:
        for mode in modes:
            moe = layer(scheme, mode)
            vs0 = f"{layer(scheme, modes[0]) / moe:.2f}x"
            vsb = f"{layer('bf16', mode) / moe:.2f}x" if "bf16" in res else "-"
            same = all(res[scheme][d]["same_tokens"] for d in depths)
            L.append(f"| {scheme} | {mode} | " + " | ".join(f"{res[scheme][d][mode]['graph_us']:.1f}" for d in depths)
                     + f" | {moe:.1f} | {vs0} | {vsb} | {'yes' if same else 'NO'} |")
    return write_results(out_dir, f"pdl-decode-{geometry}", device, L, res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="v2-lite", choices=sorted(mrc.GEOMETRIES))
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--schemes", default="bf16,w4a16,w4a8")
    ap.add_argument("--modes", default="0,1,2,3")
    ap.add_argument("--work", default="/tmp/pdl-decode")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    depths = [int(x) for x in args.layers.split(",")]
    modes = [int(x) for x in args.modes.split(",")]
    assert len(depths) >= 2 and depths[0] < depths[-1], "two depths, the shallower first"
    res = {s: {d: measure(args.geometry, d, s, modes, args.work) for d in depths} for s in args.schemes.split(",")}
    path = report(res, args.geometry, depths, modes, torch.cuda.get_device_name(), args.out)
    print(open(path).read())


if __name__ == "__main__":
    main()
