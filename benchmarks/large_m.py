"""Prefill-sized products: the paths a packed scheme can take at large M, timed side by side, and the w8a8 /
fp8-block launch configurations at M = 4096.

1. dense: R1's layer shapes at M = 64 .. 4096 for cuBLAS bf16 and, per packed scheme, the packed kernel (w4a8: on
   FP8 tensor cores, and with its rows on the FP8 grid through the 16-bit product) and the engine's large-M path
   (dequantize + cuBLAS on the scheme's activations, kernels/linear.py).
2. moe: the fused MoE at prefill token counts (V2-Lite's experts; R1's for the packed kernels), the packed experts
   against the same experts dequantized for the call (moe.DequantizedExperts), bf16 experts beside them.
3. sweep: w8a8 and fp8-block at M = 4096, a handful of tile shapes against the heuristic's.

    python benchmarks/large_m.py [--parts dense,moe,sweep] [--out benchmarks/results]
Writes large-m-<device>-<date>.md (and .json) there.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import SHAPES, bench, ceilings, make_weight, moe_experts  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import linear, moe, tuning  # noqa: E402
from lowbit.kernels import matmul_packed as mp  # noqa: E402
from lowbit.kernels import matmul_unpacked as mu  # noqa: E402

DENSE_MS = (64, 128, 256, 512, 1024, 4096)
MOE_TOKENS = (64, 256, 1024, 2048, 4096)


MODULES = {"mp": mp, "moe": moe, "linear": linear}


def timed(fn, **attrs) -> float:
    """bench(fn) with module attributes ("module.NAME": value) set for the measurement."""
    with contextlib.ExitStack() as stack:
        for key, value in attrs.items():
            mod, name = key.split(".")
            stack.enter_context(mock.patch.object(MODULES[mod], name, value))
        return bench(fn)


def dense_part() -> list[dict]:
    rows = []
    big = 1 << 30
    for name, (N, K) in SHAPES.items():
        w_bf16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        weights = {s: make_weight(s, N, K) for s in ("w4a16", "w4a8", "w4a8-int8")}
        for M in DENSE_MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_ref = bench(lambda x=x, w=w_bf16: torch.nn.functional.linear(x, w))
            row = {"shape": name, "M": M, "cublas_us": t_ref * 1e6}
            for s, (pw, act, in_scale, _) in weights.items():
                layer = linear.PackedLinear(pw, act, in_scale)
                row[f"{s} packed"] = timed(lambda x=x, layer=layer: layer(x), **{"linear.DEQUANT_ABOVE_ROWS": big})
                if s == "w4a8":
                    row[f"{s} packed, FP8 grid"] = timed(
                        lambda x=x, layer=layer: layer(x),
                        **{"linear.DEQUANT_ABOVE_ROWS": big, "mp.FP8_GRID_MAX_ROWS": big, "mp.FP8_GRID_MIN_WEIGHTS": 0})
                row[f"{s} dequantized"] = timed(lambda x=x, layer=layer: layer(x), **{"linear.DEQUANT_ABOVE_ROWS": 0})
            for key in list(row):
                if key not in ("shape", "M", "cublas_us"):
                    row[key] = {"us": row[key] * 1e6, "speedup": t_ref / row[key]}
            rows.append(row)
            print(name, M, f"cublas {t_ref * 1e6:.0f} us", " | ".join(
                f"{k} {v['us']:.0f} us {v['speedup']:.2f}x" for k, v in row.items() if isinstance(v, dict)),
                flush=True)
        del w_bf16, weights
        torch.cuda.empty_cache()
    return rows


def moe_part() -> list[dict]:
    rows = []
    big = 1 << 30
    geoms = {"V2-Lite (64 x 2048x1408, top-6)": (64, 2048, 1408, 6, MOE_TOKENS),
             "R1 (256 x 7168x2048, top-8)": (256, 7168, 2048, 8, (256, 1024))}
    for gname, (E, H, inter, k, tokens) in geoms.items():
        schemes = ("bf16", "w4a16", "w4a8") if E <= 64 else ("w4a16", "w4a8")
        experts = {s: (moe_experts(s, E, 2 * inter, H)[0], moe_experts(s, E, H, inter)[0]) for s in schemes}
        for T in tokens:
            g = torch.Generator(device="cuda").manual_seed(T)
            topk = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
            tw = torch.rand(T, k, device="cuda")
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            row = {"geometry": gname, "tokens": T}
            flops = 2 * T * k * 3 * H * inter
            for s, (w13, w2) in experts.items():
                def run(w13=w13, w2=w2, x=x, tw=tw, topk=topk):
                    return moe.fused_moe(x, w13, w2, tw, topk)
                if s == "bf16":
                    row["bf16"] = bench(run)
                    continue
                row[f"{s} packed"] = timed(run, **{"moe.DEQUANT_ROWS_PER_EXPERT": big})
                if s == "w4a8":
                    row[f"{s} packed, FP8 grid"] = timed(run, **{"moe.DEQUANT_ROWS_PER_EXPERT": big,
                                                                 "moe.FP8_TENSOR_CORES_FROM_BM": big})
                if E <= 64:
                    row[f"{s} dequantized"] = timed(run, **{"moe.DEQUANT_ROWS_PER_EXPERT": 0})
            for key in list(row):
                if key not in ("geometry", "tokens"):
                    row[key] = {"us": row[key] * 1e6, "tflops": flops / row[key] / 1e12}
            rows.append(row)
            print(gname, T, " | ".join(f"{k} {v['us']:.0f} us {v['tflops']:.0f} TF/s"
                                       for k, v in row.items() if isinstance(v, dict)), flush=True)
        del experts
        torch.cuda.empty_cache()
    return rows


SWEEP = [dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3), dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=4),
         dict(BM=128, BN=256, BK=128, num_warps=8, num_stages=3), dict(BM=256, BN=128, BK=128, num_warps=8, num_stages=3),
         dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=4), dict(BM=64, BN=256, BK=128, num_warps=4, num_stages=4)]


def sweep_part() -> list[dict]:
    rows = []
    M = 4096
    for name, (N, K) in SHAPES.items():
        w_bf16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        t_ref = bench(lambda x=x, w=w_bf16: torch.nn.functional.linear(x, w))
        for s in ("w8a8", "fp8-block"):
            w, kind, ws, _ = make_weight(s, N, K)
            cands = [None] + SWEEP
            if s == "w8a8":
                cands = [c for c in cands if c is None or c["BK"] == 128] + [dict(SWEEP[2], BK=256, num_stages=3)]
            for cfg in cands:
                try:
                    t = bench(lambda cfg=cfg, x=x, w=w, kind=kind, ws=ws: mu.unpacked_matmul(x, w, kind, ws, config=cfg))
                except Exception as e:  # noqa: BLE001 - shared memory over the chip's, say
                    print(f"  {s} {cfg}: {type(e).__name__} {str(e)[:120]}", flush=True)
                    continue
                rows.append({"shape": name, "scheme": s, "config": cfg or tuning.unpacked_config(M, N, K, kind),
                             "heuristic": cfg is None, "us": t * 1e6, "speedup": t_ref / t,
                             "tflops": 2 * M * N * K / t / 1e12, "cublas_us": t_ref * 1e6})
                print(name, s, cfg, f"{t * 1e6:.0f} us {t_ref / t:.2f}x {rows[-1]['tflops']:.0f} TF/s", flush=True)
            del w, ws
        del w_bf16, x
        torch.cuda.empty_cache()
    return rows


def report(ceil: dict, dense: list, moe_rows: list, sweep: list) -> list[str]:
    device = torch.cuda.get_device_name()
    L = [f"# Large-M paths on {device}, {datetime.date.today().isoformat()}", "",
         f"torch {torch.__version__}. Produced by `python benchmarks/large_m.py` in one run. Ceilings in this run: "
         f"copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
         f"FP8 {ceil['fp8_TFLOPs']:.0f} TFLOP/s.", ""]
    if dense:
        keys = [k for k in dense[0] if isinstance(dense[0][k], dict)]
        L += ["## Dense layers: time (us) and speed-up over cuBLAS bf16", "",
              "| shape | M | cuBLAS bf16 | " + " | ".join(keys) + " |", "| --- " * (3 + len(keys)) + "|"]
        for r in dense:
            L.append(f"| {r['shape']} | {r['M']} | {r['cublas_us']:.0f} | " + " | ".join(
                f"{r[k]['us']:.0f}, **{r[k]['speedup']:.2f}x**" for k in keys) + " |")
        L.append("")
    if moe_rows:
        L += ["## Fused MoE at prefill: time (us) and TFLOP/s of the routed products", ""]
        for gname in dict.fromkeys(r["geometry"] for r in moe_rows):
            rs = [r for r in moe_rows if r["geometry"] == gname]
            keys = [k for k in rs[0] if isinstance(rs[0][k], dict)]
            L += [f"### {gname}", "", "| tokens | " + " | ".join(keys) + " |", "| --- " * (1 + len(keys)) + "|"]
            for r in rs:
                L.append(f"| {r['tokens']} | " + " | ".join(f"{r[k]['us']:.0f} ({r[k]['tflops']:.0f})" for k in keys)
                         + " |")
            L.append("")
    if sweep:
        L += ["## w8a8 and fp8-block at M = 4096: launch configurations", "",
              "| shape | scheme | config | us | vs cuBLAS bf16 | TFLOP/s |", "| --- | --- | --- | --- | --- | --- |"]
        for r in sweep:
            cfg = ("heuristic " if r["heuristic"] else "") + ", ".join(f"{k}={v}" for k, v in r["config"].items())
            L.append(f"| {r['shape']} | {r['scheme']} | {cfg} | {r['us']:.0f} | {r['speedup']:.2f}x | "
                     f"{r['tflops']:.0f} |")
    return L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="dense,moe,sweep")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    ceil = ceilings()
    dense = dense_part() if "dense" in parts else []
    moe_rows = moe_part() if "moe" in parts else []
    sweep = sweep_part() if "sweep" in parts else []
    path = write_results(args.out, "large-m", torch.cuda.get_device_name(), report(ceil, dense, moe_rows, sweep),
                         {"ceilings": ceil, "dense": dense, "moe": moe_rows, "sweep": sweep})
    print("wrote", path)


if __name__ == "__main__":
    main()
