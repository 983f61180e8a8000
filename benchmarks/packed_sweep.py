"""The packed int4 kernel's launch configurations at one row, wider than autotuning's candidates: how much of the
gap to benchmarks/read_ceiling.py's ceiling is configuration?

For the one-token fused MoE (paired int4 experts, w4a16: gate_up with SiLU, down with the slots' sum and its K
splits, as fused_moe runs them) and R1's / V2-Lite's dense layers at M = 1 (matmul_packed.launch), every
configuration of a grid (columns a program, K splits, warps, pipeline stages; the swapped product), each replayed
from a CUDA graph with the L2 cache flushed (kernels.bench_graph), beside the engine's default; registers and shared
memory of each compiled variant.

    python benchmarks/packed_sweep.py [--out benchmarks/results] [--part moe|dense|all]
Writes packed-sweep-<device>-<date>.md (and .json).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import MOE_GEOMETRIES, bench_graph, ceilings, make_weight, one_token_moe  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import cdiv, moe  # noqa: E402
from lowbit.kernels import matmul_packed as mp  # noqa: E402

DENSE = {"r1 o_proj": (7168, 16384), "r1 dense down": (7168, 18432), "r1 dense gate_up": (36864, 7168),
         "r1 q_b": (24576, 1536), "v2lite dense gate_up": (21888, 2048)}


def timed(fn) -> float | None:
    try:
        return bench_graph(fn)
    except Exception as e:  # noqa: BLE001 - a configuration this chip cannot run (shared memory, registers)
        print("  skipped:", type(e).__name__, str(e)[:160], flush=True)
        return None


def compiled_stats() -> dict:
    """{constexpr key: (registers, spills, shared bytes)} of every compiled _packed_matmul_kernel variant."""
    out = {}
    caches = getattr(mp._packed_matmul_kernel, "device_caches", {})
    for dev in caches.values():
        for key, k in dev[0].items():
            out[str(key)] = (getattr(k, "n_regs", None), getattr(k, "n_spills", None),
                             getattr(k.metadata, "shared", None))
    return out


def last_stats(before: dict) -> tuple | None:
    new = [v for k, v in compiled_stats().items() if k not in before]
    return new[-1] if new else None


def moe_rows(copy: float) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for geo, (_, H, inter, k, shared) in MOE_GEOMETRIES.items():
        w13, b13, w2, b2, ids = one_token_moe("w4a16", geo, g)
        kk = k + shared
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        inter_buf = torch.randn(kk, inter, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, H, device="cuda", dtype=torch.bfloat16)
        rw = torch.rand(kk, device="cuda")
        slots = ids.reshape(-1).contiguous()
        m = (None, slots)
        d1 = moe.gate_up_config(w13.config(1, inter, H), True)
        d2 = w2.config(1, H, inter)
        d2 = dict(d2, SPLIT_K=moe.one_token_down_split(w2, inter, d2, kk))
        k_tiles = cdiv(inter, w2.weight.tile_k)
        grid1 = [dict(BM=16, BN=bn, num_warps=w, num_stages=s, SWAP=True)
                 for bn, w, s in itertools.product((16, 32, 64), (4, 8), (1, 2, 3))]
        grid2 = [dict(BM=16, BN=bn, SPLIT_K=sp, num_warps=w, num_stages=s, SWAP=True)
                 for bn, sp, w, s in itertools.product((32, 64, 128), (1, 2, 4), (4, 8), (1, 2, 3))
                 if k_tiles % sp == 0]
        for proj, default, grid, nbytes in (("gate_up", d1, grid1, kk * b13), ("down", d2, grid2, kk * b2)):
            res = []
            for cfg in [default] + grid:
                if proj == "gate_up":
                    fn = functools.partial(w13.run, x, inter_buf, m, cfg, fuse_silu=True, x_row_div=kk,
                                           slot_experts=slots)
                else:
                    fn = functools.partial(w2.run, inter_buf, out, m, cfg, routed_weights=rw, slot_experts=slots,
                                           sum_slots=True)
                before = compiled_stats()
                t = timed(fn)
                res.append(dict(cfg=cfg, t=t, frac=None if t is None else nbytes / t / 1e9 / copy,
                                stats=last_stats(before)))
            rows.append(summarize(f"{geo} MoE {proj} (1 token, {kk} slots)", nbytes, res))
    return rows


def dense_rows(copy: float, paired: bool) -> list[dict]:
    rows = []
    for name, (N, K) in DENSE.items():
        pw, act, xs, nbytes = make_weight("w4a16", N, K)
        if paired:
            pw = mp.pair(pw)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        k_tiles = cdiv(K, pw.tile_k)
        if paired:  # (64 weight rows a program, swapped: where the paired main loop compiles shortest)
            grid = [dict(BM=16, BN=64, SPLIT_K=sp, num_warps=4, num_stages=s, SWAP=True)
                    for sp, s in itertools.product((1, 2, 3, 4, 6, 8, 16), (2, 3, 4)) if k_tiles % sp == 0]
        else:
            grid = [dict(BM=16, BN=bn, SPLIT_K=sp, num_warps=w, num_stages=s, SWAP=True)
                    for bn, sp, w, s in itertools.product((32, 64, 128), (2, 4, 8, 16), (4, 8), (1, 3))
                    if k_tiles % sp == 0]
        res = []
        for cfg in [None] + grid:
            before = compiled_stats()
            t = timed(functools.partial(mp.packed_matmul, x, pw, act, xs, config=cfg))
            res.append(dict(cfg=cfg or "default", t=t, frac=None if t is None else nbytes / t / 1e9 / copy,
                            stats=last_stats(before)))
        rows.append(summarize(f"{name} {N}x{K}", nbytes, res))
    return rows


def summarize(layer: str, nbytes: int, res: list[dict]) -> dict:
    ok = sorted((r for r in res if r["t"] is not None), key=lambda r: r["t"])
    row = dict(layer=layer, bytes=nbytes, default=res[0], best=ok[0], top=ok[:5], sweep=res)
    print(layer, f"{nbytes / 1e6:.1f} MB", "default", fmt(res[0]), "best", fmt(ok[0]), ok[0]["cfg"], ok[0]["stats"],
          flush=True)
    for r in ok[1:5]:
        print("   ", fmt(r), r["cfg"], r["stats"], flush=True)
    return row


def fmt(r) -> str:
    return "-" if r is None or r["t"] is None else f"{r['t'] * 1e6:.1f} us ({r['frac']:.0%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--part", default="all", choices=("moe", "dense", "all"))
    ap.add_argument("--planar", action="store_true", help="dense layers in the planar layout (the engine: paired)")
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    copy = ceil["copy_GBps"]
    print(f"{device}: copy {copy:.0f} GB/s", flush=True)
    rows = (moe_rows(copy) if args.part in ("moe", "all") else []) + \
        (dense_rows(copy, not args.planar) if args.part in ("dense", "all") else [])
    lines = [f"# The packed int4 kernel's configurations at one row, {device}, {datetime.date.today().isoformat()}",
             "", f"Copy bandwidth in this run: {copy:.0f} GB/s. Produced by `python benchmarks/packed_sweep.py "
             f"--part {args.part}{' --planar' if args.planar else ''}` (w4a16): each configuration replayed from a "
             "CUDA graph with the L2 cache flushed; percentages are the weights' bytes over time against the copy "
             "bandwidth. Stats: registers a thread, "
             "spilled bytes, shared memory bytes.", "",
             "| layer | MB | default | best | best config | its stats | runners-up |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ups = "; ".join(f"{fmt(u)} {u['cfg']}" for u in r["top"][1:4])
        lines.append(f"| {r['layer']} | {r['bytes'] / 1e6:.1f} | {fmt(r['default'])} {r['default']['cfg']} | "
                     f"{fmt(r['best'])} | {r['best']['cfg']} | {r['best']['stats']} | {ups} |")
    name = f"packed-sweep-{args.part}{'-planar' if args.planar else ''}"
    path = write_results(args.out, name, device, lines, dict(device=device, ceilings=ceil, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
