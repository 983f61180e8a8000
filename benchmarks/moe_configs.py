"""Launch configurations of the fused MoE's two projections at decode sizes, each projection timed alone, and the
small-M dense cases issue #5 still misses (w8a8 at M = 16, w4a8 at M = 1..16).

The engine's MoE configuration is a heuristic (kernels/tuning.py); this measures, per scheme and token count, every
candidate on each projection (gate_up with SiLU fused, down with the routing weight) replayed from a CUDA graph with
the L2 cache flushed, as decode runs them, and the bytes of the experts reached over the time against the copy
bandwidth measured in the same run. The heuristic's own pick is timed beside the best candidate.

    python benchmarks/moe_configs.py [--out benchmarks/results] [--geometry v2lite,r1]
Writes moe-configs-<device>-<date>.md (and .json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import bench, bench_graph, ceilings, make_weight, moe_experts  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import matmul_packed as mp  # noqa: E402
from lowbit.kernels import matmul_unpacked as mu  # noqa: E402
from lowbit.kernels import moe, tuning  # noqa: E402

# name -> (routed experts, hidden, expert width, top-k, shared experts fused as more experts)
GEOMETRIES = {"v2lite": (64, 2048, 1408, 6, 2), "r1": (256, 7168, 2048, 8, 1)}


def projection_candidates(scheme: str, tokens: int = 1) -> list[dict]:
    if tokens >= 32:  # a large decode batch (offline): experts see tens of rows, the shared ones every token
        if scheme in ("bf16", "fp8-block", "w8a8"):
            return [dict(BM=bm, BN=bn, BK=128, num_warps=w, num_stages=4)
                    for bm in (16, 32, 64) for bn in (64, 128) for w in (4, 8)]
        return [dict(BM=bm, BN=bn, num_warps=w, num_stages=st, **swap)
                for bm in (16, 32, 64) for bn in (64, 128) for w in (4, 8) for st in (3,)
                for swap in ({}, {"SWAP": True})]
    if scheme in ("bf16", "fp8-block"):
        return [dict(BM=16, BN=bn, BK=128, num_warps=w, num_stages=st)
                for bn, w, st in ((16, 4, 4), (32, 4, 4), (32, 4, 6), (64, 4, 3), (64, 4, 4), (64, 8, 4),
                                  (128, 8, 3), (32, 2, 4))]
    return [dict(BM=16, BN=bn, num_warps=w, num_stages=st) for bn, w, st in
            ((16, 4, 3), (32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 3), (64, 8, 3), (32, 2, 3))] + \
        [dict(BM=16, BN=bn, num_warps=w, num_stages=3, SWAP=True) for bn, w in ((32, 4), (64, 4), (128, 8))]


def moe_rows(ceil: dict, geometry: str, schemes: list[str], tokens: list[int]) -> list[dict]:
    E, H, inter, k, shared = GEOMETRIES[geometry]
    rows = []
    for s in schemes:
        w13, b13 = moe_experts(s, E + shared, 2 * inter, H)
        w2, b2 = moe_experts(s, E + shared, H, inter)
        for T in tokens:
            g = torch.Generator(device="cuda").manual_seed(T)
            routed = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
            ids = torch.cat([routed, torch.arange(E, E + shared, device="cuda").expand(T, shared)], 1)
            tw = torch.rand(T, k + shared, device="cuda")
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            n = ids.numel()
            reached = ids.unique().numel()
            inter_buf = torch.randn(n, inter, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(n, H, device="cuda", dtype=torch.bfloat16)
            rw = tw.flatten().float().contiguous()
            per_expert = -(-n // min(n, E + shared))
            packed = isinstance(w13, moe.PackedExperts)
            heur = {"gate_up": moe.gate_up_config(w13.config(per_expert, inter, H), packed),
                    "down": w2.config(per_expert, H, inter)}
            for proj, nbytes in (("gate_up", reached * b13), ("down", reached * b2)):
                def run(cfg, proj=proj, ids=ids, n=n, x=x, inter_buf=inter_buf, out=out, rw=rw, w13=w13, w2=w2):
                    m = (*moe.align(ids, E + shared, cfg["BM"]), n)
                    if proj == "gate_up":
                        return lambda: w13.run(x, inter_buf, m, cfg, fuse_silu=True, x_row_div=k + shared)
                    return lambda: w2.run(inter_buf, out, m, cfg, routed_weights=rw)
                timed = []
                for cfg in projection_candidates(s, T) + [dict(heur[proj], heuristic=True)]:
                    c = {key: v for key, v in cfg.items() if key != "heuristic"}
                    try:
                        t = bench_graph(run(c))
                    except Exception as e:  # noqa: BLE001 - a configuration this chip cannot run
                        print(f"  {s} {proj} T={T} skipped {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                        continue
                    timed.append((t, cfg))
                    print(f"{geometry} {s} T={T} {proj} {cfg}: {t * 1e6:.1f} us "
                          f"{nbytes / t / 1e9 / ceil['copy_GBps']:.0%} of copy", flush=True)
                best_t, best = min((tc for tc in timed if not tc[1].get("heuristic")), key=lambda tc: tc[0])
                heur_t = next(t for t, c in timed if c.get("heuristic"))
                rows.append({"geometry": geometry, "scheme": s, "tokens": T, "projection": proj,
                             "experts_reached": reached, "best_us": best_t * 1e6, "best": best,
                             "best_of_copy": nbytes / best_t / 1e9 / ceil["copy_GBps"],
                             "heuristic_us": heur_t * 1e6, "heuristic": heur[proj],
                             "heuristic_of_copy": nbytes / heur_t / 1e9 / ceil["copy_GBps"],
                             "all": [(t * 1e6, c) for t, c in timed]})
            full = bench_graph(lambda x=x, tw=tw, ids=ids, w13=w13, w2=w2: moe.fused_moe(x, w13, w2, tw, ids))
            total = reached * (b13 + b2)
            rows.append({"geometry": geometry, "scheme": s, "tokens": T, "projection": "fused_moe (heuristic)",
                         "experts_reached": reached, "best_us": full * 1e6, "best": None,
                         "best_of_copy": total / full / 1e9 / ceil["copy_GBps"], "heuristic_us": full * 1e6,
                         "heuristic": None, "heuristic_of_copy": total / full / 1e9 / ceil["copy_GBps"], "all": []})
            print(f"{geometry} {s} T={T} fused_moe: {full * 1e6:.1f} us", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    return rows


def dense_rows() -> list[dict]:
    """w8a8 at M = 16 (0.76x cuBLAS in session 4's run while M = 1 and 64 ran 1.75x) and w4a8 at M = 1..16 with the
    activation quantized inside the GEMM (static scale) or before it (the per-token path given the static scale)."""
    N, K = 36864, 7168
    rows = []
    w_bf16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    w8, kind, s8, _ = make_weight("w8a8", N, K)
    pw, _, in_scale, _ = make_weight("w4a8", N, K)
    for M in (1, 4, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = bench(lambda x=x: torch.nn.functional.linear(x, w_bf16))
        cands8 = tuning.candidates(False, M, K) + [dict(BM=16, BN=bn, BK=128, SPLIT_K=sk, num_warps=w, num_stages=st)
                                                   for bn, sk, w, st in ((64, 2, 4, 4), (128, 2, 4, 4),
                                                                         (64, 1, 4, 6), (32, 2, 4, 6))]
        for cfg in cands8 + [None]:
            t = bench(lambda x=x, cfg=cfg: mu.unpacked_matmul(x, w8, kind, s8, config=cfg))
            rows.append({"case": "w8a8", "M": M, "config": cfg or "heuristic", "us": t * 1e6, "speedup": ref / t})
            print(f"w8a8 M={M} {cfg or 'heuristic'}: {t * 1e6:.1f} us {ref / t:.2f}x", flush=True)
        xq = torch.clamp(x.float() / in_scale, -448, 448).to(torch.float8_e4m3fn)
        xs = in_scale.float().expand(M).contiguous()
        for cfg in tuning.candidates(True, M, K, 4) + [None]:
            c = cfg or tuning.packed_config(M, N, K, 4, mp.ACT_FP8_STATIC)
            t_in = bench(lambda x=x, c=c: mp.packed_matmul(x, pw, mp.ACT_FP8_STATIC, in_scale, config=c))

            def output(c=c, M=M):
                split = c.get("SPLIT_K", 1) > 1
                return (torch.zeros if split else torch.empty)(M, N, device="cuda",
                                                               dtype=torch.float32 if split else torch.bfloat16)

            def pre(c=c, x=x, xs=xs, output=output):  # quantize once, then the GEMM on FP8 activations
                q = torch.clamp(x.float() / in_scale, -448, 448).to(torch.float8_e4m3fn)
                return mp.launch(q, pw, output(), mp.ACT_FP8_TOKEN, xs, c)
            t_pre = bench(pre)
            t_gemm = bench(lambda c=c, xq=xq, xs=xs, output=output: mp.launch(xq, pw, output(), mp.ACT_FP8_TOKEN,
                                                                              xs, c))
            rows.append({"case": "w4a8", "M": M, "config": cfg or "heuristic", "in_kernel_us": t_in * 1e6,
                         "prequantized_us": t_pre * 1e6, "gemm_only_us": t_gemm * 1e6, "speedup": ref / t_in,
                         "speedup_pre": ref / t_pre})
            print(f"w4a8 M={M} {cfg or 'heuristic'}: in-kernel {t_in * 1e6:.1f} us {ref / t_in:.2f}x | pre "
                  f"{t_pre * 1e6:.1f} us | gemm alone {t_gemm * 1e6:.1f} us", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--geometry", default="v2lite,r1")
    ap.add_argument("--schemes", default="bf16,w4a16,w4a8,fp8-block")
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--no-dense", action="store_true")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0)
    ceil = ceilings()
    print(json.dumps(ceil), flush=True)
    rows = []
    for geo in args.geometry.split(","):
        schemes = args.schemes.split(",") if geo == "v2lite" else [s for s in args.schemes.split(",")
                                                                  if s in ("w4a16", "w4a8")]
        rows += moe_rows(ceil, geo, schemes, [int(t) for t in args.tokens.split(",")])
    dense = [] if args.no_dense else dense_rows()
    date = datetime.date.today().isoformat()
    L = [f"# Fused MoE launch configurations per projection on {device}, {date}", "",
         f"Copy bandwidth in this run: {ceil['copy_GBps']:.0f} GB/s. Produced by `python benchmarks/moe_configs.py`"
         + (" with LOWBIT_INT4_PAIRED=1: int4 experts in the paired layout (packed_layout.pair)." if mp.PAIRED_EXPERTS
            else "."),
         "", "| geometry | scheme | tokens | projection | experts | heuristic | best candidate | best config |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        L.append(f"| {r['geometry']} | {r['scheme']} | {r['tokens']} | {r['projection']} | {r['experts_reached']} | "
                 f"{r['heuristic_us']:.1f} us ({r['heuristic_of_copy']:.0%}) {r['heuristic'] or ''} | "
                 f"{r['best_us']:.1f} us ({r['best_of_copy']:.0%}) | {r['best'] or ''} |")
    if dense:
        L += ["", "## Dense R1 gate_up 36864x7168 at small M", "", "| case | M | config | time | speed-up |",
              "| --- | --- | --- | --- | --- |"]
        for r in dense:
            if r["case"] == "w8a8":
                L.append(f"| w8a8 | {r['M']} | {r['config']} | {r['us']:.1f} us | {r['speedup']:.2f}x |")
            else:
                L.append(f"| w4a8 | {r['M']} | {r['config']} | in-kernel {r['in_kernel_us']:.1f} us, pre-quantized "
                         f"{r['prequantized_us']:.1f} us (GEMM alone {r['gemm_only_us']:.1f}) | "
                         f"{r['speedup']:.2f}x / {r['speedup_pre']:.2f}x |")
    path = write_results(args.out, "moe-configs-paired" if mp.PAIRED_EXPERTS else "moe-configs", device, L,
                         {"ceilings": ceil, "moe": rows, "dense": dense, "paired": mp.PAIRED_EXPERTS})
    print(open(path).read())


if __name__ == "__main__":
    main()
