"""Batch-1 decode time by layer, bf16 against the packed schemes, in one run: where a scheme's speed-up over bf16 is
bounded by time that does not scale with the weights' bytes (launches, latency chains) and where by the kernels.

For each scheme: a random checkpoint of the geometry with a few layers (R1: the first dense, the others MoE, at
DeepSeek-R1's widths), loaded with CUDA graphs; one replay of the batch-1 decode graph, its kernels in launch order
split by layer (profile_decode.by_layer), the best of a few replays per layer. The report gives each part's time, its
ratio to bf16 in the same run, and the whole model at the geometry's real depth estimated from those parts
(embedding + dense layers x their count + MoE layers x theirs + head), which needs no GPU that holds the model.
Programmatic dependent launch is off here (kernels overlap under it, and the split needs them not to).

    python benchmarks/layer_ratio.py --geometry r1 --layers 2 [--schemes bf16,w4a16,w4a8] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_random_checkpoint as mrc  # noqa: E402
from profile_decode import by_layer, graph_replay_time, replay_order  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit import LLM, SamplingParams  # noqa: E402
from lowbit.kernels import pdl  # noqa: E402

# the real models' (layers, dense layers first): DeepSeek-R1 has three dense layers, where the R1 geometry's cut has
# one so that a few layers reach the MoE (make_random_checkpoint.GEOMETRIES)
DEPTH = {"r1": (61, 3), "v2-lite": (27, 1)}


def measure(geometry: str, layers: int, scheme: str, work: str, replays: int = 5) -> dict:
    cfg = dict(mrc.GEOMETRIES[geometry], num_hidden_layers=layers)
    path = os.path.join(work, f"{geometry}-{layers}l-{scheme}")
    if not os.path.exists(os.path.join(path, "config.json")):
        mrc.write(cfg, path, scheme, device="cuda", progress=False)
    llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=512)
    llm.generate([list(range(10, 42))], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    parts = [by_layer(replay_order(llm), layers) for _ in range(replays)]
    out = {"graph_us": graph_replay_time(llm) * 1e6,
           "before": min(p["before"] for p in parts), "head": min(p["head"] for p in parts),
           "layers": [min(p["layers"][i] for p in parts) for i in range(layers)],
           "dense_layers": cfg["first_k_dense_replace"]}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    shutil.rmtree(path, ignore_errors=True)  # R1's widths: tens of GB a checkpoint
    return out


def estimate(r: dict, depth: int, dense: int) -> float:
    """us per token at the real depth of which the first `dense` layers are dense: embedding + dense layers (the cut's
    dense layers' mean) + MoE layers (the cut's MoE layers' mean) + head."""
    n = r["dense_layers"]
    dense_us, moe_us = r["layers"][:n], r["layers"][n:]
    return (r["before"] + sum(dense_us) / len(dense_us) * dense + sum(moe_us) / len(moe_us) * (depth - dense)
            + r["head"])


def report(results: dict, geometry: str, layers: int, device: str, out_dir: str) -> str:
    base = results.get("bf16")
    L = [f"# Batch-1 decode by layer, {geometry} widths, {layers} layers, on {device}", "",
         "Produced by `python benchmarks/layer_ratio.py`: one replay of the batch-1 decode graph split by layer "
         "(the best of five), every scheme in the same run; ratios are bf16's time over the scheme's.", "",
         "| scheme | graph replay (us) | embedding | first layer (dense) | MoE layer (mean) | head + sampling | "
         f"{DEPTH[geometry][0]} layers ({DEPTH[geometry][1]} dense), estimated (us) | tok/s, estimated | "
         "vs bf16, MoE layer | vs bf16, whole model |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for scheme, r in results.items():
        n = r["dense_layers"]
        moe = sum(r["layers"][n:]) / max(1, len(r["layers"][n:]))
        est = estimate(r, *DEPTH[geometry])
        if base:
            bmoe = sum(base["layers"][n:]) / max(1, len(base["layers"][n:]))
            ratios = f"{bmoe / moe:.2f}x | {estimate(base, *DEPTH[geometry]) / est:.2f}x"
        else:
            ratios = "- | -"
        L.append(f"| {scheme} | {r['graph_us']:.1f} | {r['before']:.1f} | {r['layers'][0]:.1f} | {moe:.1f} | "
                 f"{r['head']:.1f} | {est:.0f} | {1e6 / est:.1f} | {ratios} |")
    return write_results(out_dir, f"layer-ratio-{geometry}", device, L, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="r1", choices=sorted(DEPTH))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--schemes", default="bf16,w4a16,w4a8")
    ap.add_argument("--work", default="/tmp/layer-ratio")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    # the split adds kernel durations, which must not overlap: with programmatic dependent launch a kernel placed
    # early counts its wait (benchmarks/pdl_decode.py measures what PDL changes)
    pdl.MODE = 0
    results = {}
    for scheme in args.schemes.split(","):
        results[scheme] = measure(args.geometry, args.layers, scheme, args.work)
        r = results[scheme]
        print(f"{scheme}: graph {r['graph_us']:.1f} us, embedding {r['before']:.1f}, layers "
              f"{', '.join(f'{t:.1f}' for t in r['layers'])}, head {r['head']:.1f}", flush=True)
    path = report(results, args.geometry, args.layers, torch.cuda.get_device_name(), args.out)
    with open(path) as f:
        print(f.read())


if __name__ == "__main__":
    main()
