"""w4a8's one-token MoE by where each slot's row goes onto its expert's FP8 grid (moe.W4A8_ONE_TOKEN): "launch"
(act_quant.fp8_grid_rows before each projection), "row" (each program of both products: matmul_packed ROW_GRID),
"epilogue" (gate_up's input by the launch, down's by gate_up's epilogue: GRID_OUT), "row-epilogue" (no launch).

Two measures in one run, modes in the order given (the first again at the end, to see drift):
- the fused MoE alone at one token, V2-Lite's and R1's experts (per-expert input scales), replayed from a CUDA graph
  with the L2 cache flushed (kernels.bench_graph), beside w4a16's on the same experts' shapes;
- the batch-1 decode graph of a random V2-Lite checkpoint in w4a8 at two depths, captured again under each mode and
  replayed back to back (as pdl_decode.py): a MoE layer is the difference over the layers between; the greedy tokens
  of every mode must be the first mode's (the modes compute the same bits).

    python benchmarks/w4a8_one_token.py [--modes launch,row,epilogue,row-epilogue] [--layers 2,4]
Writes w4a8-one-token-<device>-<date>.md (and .json) under benchmarks/results.
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
from kernels import bench_graph, ceilings, moe_experts  # noqa: E402
from moe_configs import GEOMETRIES  # noqa: E402
from profile_decode import graph_replay_time  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit import LLM, SamplingParams  # noqa: E402
from lowbit.kernels import moe  # noqa: E402

PROMPT = list(range(10, 42))


def kernel_rows(modes: list[str]) -> list[dict]:
    rows = []
    for geometry in ("v2lite", "r1"):
        E, H, inter, k, shared = GEOMETRIES[geometry]
        n_exp = E + shared
        g = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.cat([torch.randperm(E, device="cuda", generator=g)[:k],
                         torch.arange(E, n_exp, device="cuda")])[None].int()
        tw = torch.rand(1, k + shared, device="cuda")
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        for scheme in ("w4a16", "w4a8"):
            w13, b13 = moe_experts(scheme, n_exp, 2 * inter, H)
            w2, b2 = moe_experts(scheme, n_exp, H, inter)
            if scheme == "w4a8":  # a scale per expert, as a calibrated checkpoint has
                w13.input_scale = torch.rand(n_exp, device="cuda") * 0.01 + 0.005
                w2.input_scale = torch.rand(n_exp, device="cuda") * 0.01 + 0.005
            nbytes = (k + shared) * (b13 + b2)
            for mode in (modes + modes[:1]) if scheme == "w4a8" else ["-"]:
                moe.W4A8_ONE_TOKEN = mode if mode != "-" else modes[0]
                t = bench_graph(lambda: moe.fused_moe(x, w13, w2, tw, ids))
                rows.append({"geometry": geometry, "scheme": scheme, "mode": mode, "us": t * 1e6, "bytes": nbytes})
                print(f"{geometry} {scheme} {mode}: {t * 1e6:.1f} us", flush=True)
            if scheme == "w4a8":
                rows_in = torch.randn(k + shared, inter, device="cuda", dtype=torch.bfloat16)
                from lowbit.kernels import act_quant
                t = bench_graph(lambda: act_quant.fp8_grid_rows(rows_in, w2.static_scales(), ids.flatten()))
                rows.append({"geometry": geometry, "scheme": scheme, "mode": "fp8_grid_rows alone (down's input)",
                             "us": t * 1e6, "bytes": 0})
            del w13, w2
            torch.cuda.empty_cache()
    return rows


def graph_rows(modes: list[str], depths: list[int], work: str) -> dict:
    res = {}
    for scheme in ("w4a8", "w4a16"):
        for layers in depths:
            cfg = dict(mrc.GEOMETRIES["v2-lite"], num_hidden_layers=layers)
            path = os.path.join(work, f"v2-lite-{layers}l-{scheme}")
            if not os.path.exists(os.path.join(path, "config.json")):
                mrc.write(cfg, path, scheme, device="cuda", progress=False)
            llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=1, max_model_len=512)
            params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
            for i, mode in enumerate((modes + modes[:1]) if scheme == "w4a8" else ["-"]):
                moe.W4A8_ONE_TOKEN = mode if mode != "-" else modes[0]
                llm.engine.runner.capture_graphs([1])
                tokens = llm.generate([PROMPT], params)[0].token_ids
                times = [graph_replay_time(llm) * 1e6 for _ in range(5)]
                key = f"{mode}" if i < len(modes) or scheme != "w4a8" else f"{mode} (again)"
                res.setdefault(scheme, {}).setdefault(key, {})[layers] = {
                    "graph_us": statistics.median(times), "spread_us": max(times) - min(times), "tokens": tokens}
                print(f"{scheme} {layers} layers {key}: {statistics.median(times):.1f} us", flush=True)
            del llm
            gc.collect()
            torch.cuda.empty_cache()
            shutil.rmtree(path, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="launch,row,epilogue,row-epilogue")
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--work", default="/tmp/w4a8-one-token")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--skip-graph", action="store_true")
    args = ap.parse_args()
    modes = args.modes.split(",")
    depths = [int(d) for d in args.layers.split(",")]
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    kr = kernel_rows(modes)
    L = [f"# w4a8's one-token MoE by where its rows go onto the FP8 grid, on {device}", "",
         f"Produced by `python benchmarks/w4a8_one_token.py --modes {args.modes}`. Copy bandwidth in this run: "
         f"{ceil['copy_GBps']:.0f} GB/s. Modes: launch = fp8_grid_rows before each projection; row = each program "
         "of both products puts its row on the grid (ROW_GRID); epilogue = gate_up's input by the launch, down's by "
         "gate_up's epilogue (GRID_OUT); row-epilogue = no launch. The first mode is run again last.", "",
         "## The fused MoE at one token (CUDA graph, L2 flushed)", "",
         "| geometry | scheme | mode | us | of copy bandwidth |", "| --- | --- | --- | --- | --- |"]
    seen = {}
    for r in kr:
        key = (r["geometry"], r["mode"])
        label = r["mode"] + (" (again)" if key in seen and r["scheme"] == "w4a8" else "")
        seen[key] = True
        frac = f"{r['bytes'] / (r['us'] * 1e-6) / 1e9 / ceil['copy_GBps']:.0%}" if r["bytes"] else "-"
        L.append(f"| {r['geometry']} | {r['scheme']} | {label} | {r['us']:.1f} | {frac} |")
    data = {"ceilings": ceil, "kernel": kr}
    if not args.skip_graph:
        gr = graph_rows(modes, depths, args.work)
        a, b = depths[0], depths[-1]
        first = gr["w4a8"][modes[0]][a]["tokens"], gr["w4a8"][modes[0]][b]["tokens"]
        L += ["", f"## V2-Lite decode graph, batch 1 (median of five timings of 50 replays); MoE layer = (graph at "
              f"{b} layers - graph at {a}) / {b - a}", "",
              f"| scheme | mode | graph, {a} layers (us) | graph, {b} layers (us) | MoE layer (us) | "
              "greedy tokens as the first mode |", "| --- | --- | --- | --- | --- | --- |"]
        for scheme, by_mode in gr.items():
            for mode, by_depth in by_mode.items():
                layer = (by_depth[b]["graph_us"] - by_depth[a]["graph_us"]) / (b - a)
                same = "-" if scheme != "w4a8" else \
                    "yes" if (by_depth[a]["tokens"], by_depth[b]["tokens"]) == first else "NO"
                L.append(f"| {scheme} | {mode} | {by_depth[a]['graph_us']:.1f} | {by_depth[b]['graph_us']:.1f} | "
                         f"{layer:.1f} | {same} |")
        for by_mode in gr.values():
            for by_depth in by_mode.values():
                for d in by_depth.values():
                    del d["tokens"]
        data["graph"] = gr
    path = write_results(args.out, "w4a8-one-token", device, L, data)
    print(open(path).read())


if __name__ == "__main__":
    main()
