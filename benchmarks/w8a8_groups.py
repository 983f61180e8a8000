"""w8a8 with int8 activations scaled per token and 32 features (`--act-group-size 32`, KIND_INT8_G32: w8a16's
product on rows put on their groups' grids in 16 bits) against w8a8 per token (KIND_INT8_CHANNEL) and cuBLAS bf16,
on one GPU, in one run: what the finer activation scales cost.

The ceilings first (copy bandwidth, bf16 matrix rate: kernels.ceilings). Then R1's three dense shapes at M = 1, 16,
32, 64, 4096 (decode sizes replayed from a CUDA graph with the L2 flushed, as kernels.py; 4096 eagerly), each path as
the engine calls it (UnpackedLinear: w8a8 per token's quantization launch, or its row quantized inside the product
at one row; the groups' grid launch, then w8a16's product; above 64 rows the matrix library on dequantized weights),
with the heuristic configuration (tuning.unpacked_config) and, for the groups at the row counts --sweep names (1
when given alone), a sweep of configurations around it. Last, the one-token fused MoE at R1's and V2-Lite's expert
shapes, routed and shared experts as the engine stacks them.

    python benchmarks/w8a8_groups.py [--sweep [ROWS]] [--out benchmarks/results]
Writes w8a8-groups-<device>-<date>.md (and .json).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels as kb  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import linear, moe, tuning  # noqa: E402
from lowbit.kernels import matmul_unpacked as mu  # noqa: E402

MS = [1, 16, 32, 64, 4096]
SCHEMES = ["bf16", "w8a8", "w8a8-g32"]


def timed(fn, m: int) -> float:
    return kb.bench_graph(fn) if m <= kb.DECODE_M else kb.bench(fn)


def dense_layer(scheme: str, N: int, K: int):
    """x -> y as the engine's layer computes it, and the bytes of its weights."""
    if scheme == "bf16":
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        return (lambda x, cfg=None: torch.nn.functional.linear(x, w)), N * K * 2, None
    w, kind, s, nbytes = kb.make_weight(scheme, N, K)
    layer = linear.UnpackedLinear(w, kind, s)
    def run(x, cfg=None):
        return layer(x) if cfg is None else mu.unpacked_matmul(x, w, kind, s, config=cfg)
    return run, nbytes, kind


def sweep_configs(m: int, N: int, K: int) -> list[dict]:
    base = tuning.unpacked_config(m, N, K, mu.KIND_INT8_G32)
    out = [base]
    if m > 16:  # row tiles: wgmma from 64 rows (its operand tiles through shared memory), mma below
        for bm in (16, 32, 64):
            for bn in (32, 64, 128):
                for stages in (3, 4):
                    c = dict(base, BM=bm, BN=bn, num_stages=stages)
                    if c not in out:
                        out.append(c)
    elif m <= 64:
        for bn in (32, 64, 128):
            for stages in (3, 4, 6):
                for split in {base.get("SPLIT_K", 1), max(1, base.get("SPLIT_K", 1) // 2),
                              2 * base.get("SPLIT_K", 1)}:
                    c = dict(base, BN=bn, num_stages=stages, SPLIT_K=split)
                    if c not in out and split <= -(-K // base["BK"]):
                        out.append(c)
    return out


def dense_table(ceil: dict, sweep: set[int]) -> tuple[list[dict], list[dict]]:
    rows, swept = [], []
    for sname, (N, K) in kb.SHAPES.items():
        for m in MS:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            times = {}
            for scheme in SCHEMES:
                fn, nbytes, kind = dense_layer(scheme, N, K)
                times[scheme] = timed(lambda fn=fn, x=x: fn(x), m)
                if scheme == "w8a8-g32" and m in sweep:
                    for cfg in sweep_configs(m, N, K):
                        try:
                            t = timed(lambda fn=fn, cfg=cfg, x=x: fn(x, cfg), m)
                        except Exception as e:  # noqa: BLE001 - a configuration this chip cannot run
                            print(f"  skipped {cfg}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                            continue
                        swept.append({"shape": sname, "M": m, "config": cfg, "us": t * 1e6})
                        print(f"  sweep {sname} M={m} {cfg}: {t * 1e6:.1f} us", flush=True)
                del fn
                torch.cuda.empty_cache()
            r = {"shape": sname, "M": m, **{f"{s}_us": times[s] * 1e6 for s in SCHEMES},
                 "g32_over_bf16": times["bf16"] / times["w8a8-g32"], "g32_over_w8a8": times["w8a8"] / times["w8a8-g32"],
                 "g32_of_copy": (N * K + N * 2) / times["w8a8-g32"] / 1e9 / ceil["copy_GBps"],
                 "config": ("dequantized weights, the matrix library" if m > linear.DEQUANT_ABOVE_ROWS
                            else tuning.unpacked_config(m, N, K, mu.KIND_INT8_G32))}
            rows.append(r)
            print(f"{sname} M={m}: bf16 {r['bf16_us']:.1f} us, w8a8 {r['w8a8_us']:.1f}, w8a8-g32 "
                  f"{r['w8a8-g32_us']:.1f} ({r['g32_over_bf16']:.2f}x bf16, {r['g32_over_w8a8']:.2f}x w8a8, "
                  f"{r['g32_of_copy']:.0%} of copy)", flush=True)
    return rows, swept


def moe_table(ceil: dict) -> list[dict]:
    rows = []
    for geometry in ("r1", "v2lite"):
        times = {}
        for scheme in SCHEMES:
            g = torch.Generator(device="cuda").manual_seed(0)
            w13, b13, w2, b2, ids = kb.one_token_moe(scheme, geometry, g)
            x = torch.randn(1, w13.shape[2], device="cuda", dtype=torch.bfloat16)
            tw = torch.rand(ids.shape, device="cuda")
            times[scheme] = kb.bench_graph(lambda x=x, w13=w13, w2=w2, tw=tw, ids=ids:
                                           moe.fused_moe(x, w13, w2, tw, ids))
            if scheme == "w8a8-g32":
                nbytes = ids.numel() * (b13 + b2)
            del w13, w2
            torch.cuda.empty_cache()
        r = {"geometry": geometry, **{f"{s}_us": times[s] * 1e6 for s in SCHEMES},
             "g32_over_bf16": times["bf16"] / times["w8a8-g32"], "g32_over_w8a8": times["w8a8"] / times["w8a8-g32"],
             "g32_of_copy": nbytes / times["w8a8-g32"] / 1e9 / ceil["copy_GBps"]}
        rows.append(r)
        print(f"one-token MoE {geometry}: bf16 {r['bf16_us']:.1f} us, w8a8 {r['w8a8_us']:.1f}, w8a8-g32 "
              f"{r['w8a8-g32_us']:.1f} ({r['g32_over_bf16']:.2f}x bf16, {r['g32_over_w8a8']:.2f}x w8a8, "
              f"{r['g32_of_copy']:.0%} of copy)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", nargs="?", const="1", default="",
                    help="time configurations around the heuristic's (groups) at these row counts (default 1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    ceil = kb.ceilings()
    print(f"{device}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    rows, swept = dense_table(ceil, {int(m) for m in args.sweep.split(",") if m})
    moe_rows = moe_table(ceil)
    L = [f"# w8a8 with int8 activation groups of 32 against w8a8 per token and cuBLAS bf16: {device}", "",
         "`python benchmarks/w8a8_groups.py" + (f" --sweep {args.sweep}" if args.sweep else "") + "`. Copy bandwidth "
         f"{ceil['copy_GBps']:.0f} GB/s, bf16 matrix rate {ceil['bf16_TFLOPs']:.0f} TFLOP/s, both in this run. "
         "Times in us: M <= 64 replayed from a CUDA graph with the L2 flushed, M = 4096 eagerly; each path as the "
         "engine's layer calls it (the activations' quantization included), heuristic configurations.", "",
         "## Dense layers, R1 shapes", "",
         "| shape | M | bf16 | w8a8 (per token) | w8a8-g32 | g32 vs bf16 | g32 vs w8a8 | g32 of copy | g32 config |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        L.append(f"| {r['shape']} | {r['M']} | {r['bf16_us']:.1f} | {r['w8a8_us']:.1f} | {r['w8a8-g32_us']:.1f} | "
                 f"{r['g32_over_bf16']:.2f}x | {r['g32_over_w8a8']:.2f}x | {r['g32_of_copy']:.0%} | {r['config']} |")
    L += ["", "## One-token fused MoE (routed top-k and shared experts)", "",
          "| geometry | bf16 | w8a8 | w8a8-g32 | g32 vs bf16 | g32 vs w8a8 | g32 of copy |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in moe_rows:
        L.append(f"| {r['geometry']} | {r['bf16_us']:.1f} | {r['w8a8_us']:.1f} | {r['w8a8-g32_us']:.1f} | "
                 f"{r['g32_over_bf16']:.2f}x | {r['g32_over_w8a8']:.2f}x | {r['g32_of_copy']:.0%} |")
    if swept:
        L += ["", "## Sweep (w8a8-g32)", "", "| shape | M | config | us |", "| --- | --- | --- | --- |"]
        best = {}
        for s in swept:
            key = (s["shape"], s["M"])
            if key not in best or s["us"] < best[key]["us"]:
                best[key] = s
        for s in swept:
            mark = " **best**" if best[(s["shape"], s["M"])] is s else ""
            L.append(f"| {s['shape']} | {s['M']} | {s['config']} | {s['us']:.1f}{mark} |")
    path = write_results(args.out, "w8a8-groups", device, L,
                         {"device": device, "ceilings": ceil, "dense": rows, "moe": moe_rows, "sweep": swept})
    print(path)


if __name__ == "__main__":
    main()
