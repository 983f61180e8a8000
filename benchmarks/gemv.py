"""The one-row packed GEMV (lowbit/kernels/gemv_packed.py) against the tensor-core kernel it replaces at batch 1.

Per scheme (w4a16, w4a8, w8a16, w4a8-int8) and geometry: the fused MoE's projections at one token (gate_up with
SiLU, down with the routing weight; V2-Lite: top-6 + 2 shared experts of 2048 x 1408), each GEMV launch
configuration and the tensor-core kernel's heuristic; the whole fused_moe both ways; and the dense layers a decode
step runs at one row. Replayed from a CUDA graph with the L2 cache flushed (benchmarks/kernels.py bench_graph),
bytes of the weights read over the time against the copy bandwidth measured in the same run.

    python benchmarks/gemv.py [--out benchmarks/results] [--geometry v2lite,r1] [--schemes w4a16,...]
Writes gemv-<device>-<date>.md (and .json).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import MOE_GEOMETRIES, bench_graph, ceilings, one_token_moe  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import gemv_packed, moe, tuning  # noqa: E402
from lowbit.kernels import matmul_packed as mp  # noqa: E402

# name -> dense [N, K] layers a decode step runs on packed weights
DENSE = {"v2lite": {"q+kv_a": (3072 + 576, 2048), "o_proj": (2048, 2048), "dense gate_up": (2 * 10944, 2048),
                    "dense down": (2048, 10944)},
         "r1": {"q_a+kv_a": (1536 + 576, 7168), "q_b": (24576, 1536), "o_proj": (7168, 16384),
                "dense gate_up": (36864, 7168), "dense down": (7168, 18432)}}
GEMV_CONFIGS = [dict(BN=bn, num_warps=w) for bn in (8, 16, 32) for w in (2, 4)]
DENSE_CONFIGS = [dict(GEMV=True, BN=bn, TILES=t, num_warps=w) for bn in (8, 16, 32) for t in (1, 2, 4, 1 << 20)
                 for w in (2, 4)]


def timed(fn) -> float | str:
    try:
        return bench_graph(fn)
    except Exception as e:  # noqa: BLE001 - a configuration this chip cannot run
        return f"{type(e).__name__}: {str(e)[:120]}"


def best(results: dict) -> tuple[str, float]:
    ok = {k: v for k, v in results.items() if isinstance(v, float)}
    key = min(ok, key=ok.get)
    return key, ok[key]


def moe_rows(copy: float, geometry: str, scheme: str) -> list[dict]:
    E, H, inter, k, shared = MOE_GEOMETRIES[geometry]
    w13, b13, w2, b2, ids = one_token_moe(scheme, geometry, torch.Generator(device="cuda").manual_seed(0))
    kk = k + shared
    tw = torch.rand(1, kk, device="cuda")
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    inter_buf = torch.randn(kk, inter, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(kk, H, device="cuda", dtype=torch.bfloat16)
    rw = tw.flatten().float().contiguous()
    slots = ids.reshape(-1)
    rows = []
    for proj, experts, nbytes in (("gate_up", w13, kk * b13), ("down", w2, kk * b2)):
        src = x if proj == "gate_up" else inter_buf
        xq, xs = gemv_packed.input_rows(src, experts.act, experts.input_scale)
        if experts.act == mp.ACT_FP8_STATIC and xs.numel() == 1:
            xs = xs.expand(experts.weight.num_experts).contiguous()
        res = {}
        for cfg in GEMV_CONFIGS:
            if proj == "gate_up":
                fn = lambda cfg=cfg, xq=xq, xs=xs: gemv_packed.launch(xq, w13.weight, inter_buf, w13.act, xs, cfg,
                                                                      slots, True, x_row_div=kk)
            else:
                fn = lambda cfg=cfg, xq=xq, xs=xs: gemv_packed.launch(xq, w2.weight, out, w2.act, xs, cfg, slots,
                                                                      routed_weights=rw)
            res[str(cfg)] = timed(fn)
        heur = tuning.gemv_config(experts.weight.n, experts.weight.k, experts.weight.bits, kk, proj == "gate_up")
        # the tensor-core kernel as fused_moe ran it before the GEMV (its heuristic configuration)
        packed = moe.gate_up_config(experts.config(1, inter, H), True) if proj == "gate_up" \
            else experts.config(1, H, inter)

        def tc(cfg=packed, proj=proj):
            m = (*moe.align(ids, E + shared, cfg["BM"]), kk)
            if proj == "gate_up":
                return w13.run(x, inter_buf, m, cfg, fuse_silu=True, x_row_div=kk, slot_experts=slots)
            return w2.run(inter_buf, out, m, cfg, routed_weights=rw, slot_experts=slots)
        t_tc = timed(tc)
        key, t = best(res)
        rows.append(dict(geometry=geometry, scheme=scheme, layer=f"MoE {proj} (1 token, {kk} experts)",
                         bytes=nbytes, gemv=res, gemv_heuristic=str(heur), t_heuristic=res.get(str(heur)),
                         best=key, t_best=t, t_tensor_cores=t_tc, copy=copy))
    for flag in (False, True):
        gemv_packed.MOE = flag
        t = timed(lambda: moe.fused_moe(x, w13, w2, tw, ids))
        rows.append(dict(geometry=geometry, scheme=scheme, layer="fused_moe " + ("GEMV" if flag else "tensor cores"),
                         bytes=kk * (b13 + b2), t_best=t, copy=copy))
    gemv_packed.MOE = False
    return rows


def dense_rows(copy: float, geometry: str, scheme: str) -> list[dict]:
    from kernels import make_weight
    rows = []
    for name, (N, K) in DENSE[geometry].items():
        pw, act, xs, nbytes = make_weight(scheme, N, K)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        res = {}
        run = lambda cfg, x=x, pw=pw, act=act, xs=xs: (lambda: mp.packed_matmul(x, pw, act, xs, config=cfg))
        for cfg in DENSE_CONFIGS:
            res[str(cfg)] = timed(run(cfg))
        heur = dict(tuning.gemv_config(pw.n, pw.k, pw.bits), GEMV=True)
        t_h = timed(run(heur))
        t_tc = timed(run(tuning.packed_config(1, pw.n, pw.k, pw.bits, act)))
        key, t = best(res)
        rows.append(dict(geometry=geometry, scheme=scheme, layer=f"dense {name} {N}x{K}", bytes=nbytes, gemv=res,
                         gemv_heuristic=str(heur), t_heuristic=t_h, best=key, t_best=t, t_tensor_cores=t_tc,
                         copy=copy))
    return rows


def fmt(t, nbytes, copy) -> str:
    if not isinstance(t, float):
        return "-"
    return f"{t * 1e6:.1f} us ({nbytes / t / 1e9 / copy:.0%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--geometry", default="v2lite,r1")
    ap.add_argument("--schemes", default="w4a16,w4a8,w8a16,w4a8-int8")
    ap.add_argument("--no-dense", action="store_true")
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    copy = ceil["copy_GBps"]
    print(f"{device}: copy {copy:.0f} GB/s", flush=True)
    rows = []
    for geometry in args.geometry.split(","):
        for scheme in args.schemes.split(","):
            new = moe_rows(copy, geometry, scheme) + ([] if args.no_dense else dense_rows(copy, geometry, scheme))
            for r in new:
                print(r["geometry"], r["scheme"], r["layer"], "best", fmt(r["t_best"], r["bytes"], copy),
                      r.get("best", ""), "heuristic", fmt(r.get("t_heuristic"), r["bytes"], copy),
                      "tensor cores", fmt(r.get("t_tensor_cores"), r["bytes"], copy), flush=True)
            rows += new
    lines = [f"# One-row packed GEMV vs the tensor-core kernel on {device}, {datetime.date.today().isoformat()}", "",
             f"Copy bandwidth in this run: {copy:.0f} GB/s. Produced by `python benchmarks/gemv.py`: each layer at "
             "one row replayed from a CUDA graph, L2 flushed; percentages are bytes of weights read over the time "
             "against the copy bandwidth.", "",
             "| geometry | scheme | layer | tensor cores (before) | GEMV heuristic | GEMV best | best config |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "gemv" in r:
            lines.append(f"| {r['geometry']} | {r['scheme']} | {r['layer']} | "
                         f"{fmt(r['t_tensor_cores'], r['bytes'], copy)} | {fmt(r['t_heuristic'], r['bytes'], copy)} "
                         f"({r['gemv_heuristic']}) | {fmt(r['t_best'], r['bytes'], copy)} | {r['best']} |")
        else:
            lines.append(f"| {r['geometry']} | {r['scheme']} | {r['layer']} | | | "
                         f"{fmt(r['t_best'], r['bytes'], copy)} | |")
    path = write_results(args.out, "gemv", device, lines, dict(device=device, ceilings=ceil, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
