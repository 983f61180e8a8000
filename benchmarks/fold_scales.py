"""Group scales folded into the int4 weights (matmul_packed's FOLD) against the per-group accumulator chain, at one
row, on w4a16's paired layout: the one-token fused MoE's two projections and the dense layers (which the engine
keeps planar today: paired measured here too).

Each variant is checked against a float64 reference first (its relative error printed), then replayed from a CUDA
graph with the L2 cache flushed (kernels.bench_graph); percentages are the weights' bytes over time against the
copy bandwidth measured in the same run.

    python benchmarks/fold_scales.py [--out benchmarks/results]
Writes fold-scales-<device>-<date>.md (and .json).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import bench_graph, ceilings  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import moe  # noqa: E402
from lowbit.kernels import matmul_packed as mp  # noqa: E402

MOE_SHAPES = {"v2lite": (64, 2048, 1408, 6, 2), "r1": (256, 7168, 2048, 8, 1)}
DENSE = {"r1 o_proj": (7168, 16384), "r1 dense down": (7168, 18432), "r1 dense gate_up": (36864, 7168),
         "r1 q_b": (24576, 1536), "r1 q_a+kv_a": (2112, 7168), "v2lite dense gate_up": (21888, 2048),
         "v2lite q+kv_a": (3648, 2048), "v2lite o_proj": (2048, 2048)}


def weight(E: int, N: int, K: int, paired: bool = True) -> tuple[mp.PackedWeight, int]:
    parts = []
    for e0 in range(0, E, 32):
        e1 = min(E, e0 + 32)
        values = torch.randint(-8, 8, (e1 - e0, N, K), dtype=torch.int8, device="cuda")
        scale = torch.rand(e1 - e0, N, K // 128, device="cuda") * 0.01 + 1e-3
        parts.append(mp.repack(values, scale, None, 4, 128, paired=paired))
    pw = parts[0]
    pw.words, pw.scales = torch.cat([p.words for p in parts]), torch.cat([p.scales for p in parts])
    return pw, pw.words[0].numel() * 4 + pw.scales[0].numel() * 2


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    copy = ceil["copy_GBps"]
    print(f"{device}: copy {copy:.0f} GB/s", flush=True)
    rows = []

    def record(layer, variant, fn, nbytes, err):
        t = bench_graph(fn)
        r = dict(layer=layer, variant=variant, t=t, frac=nbytes / t / 1e9 / copy, err=err, bytes=nbytes)
        print(f"{layer:28s} {variant:34s} {t * 1e6:7.1f} us {r['frac']:4.0%}  rel err {err:.2e}", flush=True)
        rows.append(r)

    g = torch.Generator(device="cuda").manual_seed(0)
    for geo, (E, H, inter, k, shared) in MOE_SHAPES.items():
        p13, b13 = weight(E + shared, 2 * inter, H)
        p2, b2 = weight(E + shared, H, inter)
        w13, w2 = moe.PackedExperts(p13), moe.PackedExperts(p2)
        ids = torch.cat([torch.randperm(E, device="cuda", generator=g)[:k],
                         torch.arange(E, E + shared, device="cuda")])[None].int()
        kk = k + shared
        slots = ids.reshape(-1).contiguous()
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        inter_buf = torch.randn(kk, inter, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, H, device="cuda", dtype=torch.bfloat16)
        rw = torch.rand(kk, device="cuda")
        m = (None, slots)
        d1 = moe.gate_up_config(w13.config(1, inter, H), True)
        d2 = w2.config(1, H, inter)
        d2 = dict(d2, SPLIT_K=moe.one_token_down_split(w2, inter, d2, kk))
        # references: the slots' experts dequantized in float64
        wd13 = torch.stack([mp.dequantize(p13, torch.float32, int(e)) for e in slots]).double()
        wd2 = torch.stack([mp.dequantize(p2, torch.float32, int(e)) for e in slots]).double()
        gu = wd13 @ x.double()[0]
        ref1 = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        ref2 = (rw.double()[:, None] * (wd2 @ inter_buf.double()[..., None])[..., 0]).sum(0, keepdim=True)
        for fold in (False, True):
            c1, c2 = dict(d1, FOLD=fold), dict(d2, FOLD=fold)
            f1 = functools.partial(w13.run, x, inter_buf, m, c1, fuse_silu=True, x_row_div=kk, slot_experts=slots)
            f2 = functools.partial(w2.run, inter_buf, out, m, c2, routed_weights=rw, slot_experts=slots,
                                   sum_slots=True)
            f1()
            e1 = rel(inter_buf, ref1)
            inter_buf.copy_(torch.randn(kk, inter, generator=torch.Generator(device="cuda").manual_seed(1),
                                        device="cuda").to(torch.bfloat16))
            ref2 = (rw.double()[:, None] * (wd2 @ inter_buf.double()[..., None])[..., 0]).sum(0, keepdim=True)
            f2()
            e2 = rel(out, ref2)
            name = "fold" if fold else "chain per group (engine)"
            record(f"{geo} MoE gate_up ({kk} slots)", name, f1, kk * b13, e1)
            record(f"{geo} MoE down ({kk} slots)", name, f2, kk * b2, e2)
    for name, (N, K) in DENSE.items():
        planar, nbytes = weight(1, N, K, paired=False)
        paired = mp.pair(planar)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ mp.dequantize(planar, torch.float32).double().t()
        variants = [("planar, engine default", planar, None)]
        for split in (4, 8):
            if (K // 256) % split:
                continue
            base = dict(BM=16, BN=64, SPLIT_K=split, num_warps=4, num_stages=3, SWAP=True)
            variants += [(f"paired, 64 cols, {split} splits", paired, base),
                         (f"paired+fold, 64 cols, {split} splits", paired, dict(base, FOLD=True))]
        for variant, pw, cfg in variants:
            fn = functools.partial(mp.packed_matmul, x, pw, mp.ACT_NONE, None, config=cfg)
            record(f"{name} {N}x{K}", variant, fn, nbytes, rel(fn(), ref))
    lines = [f"# Group scales folded into the int4 weights at one row, {device}, {datetime.date.today().isoformat()}",
             "", f"Copy bandwidth in this run: {copy:.0f} GB/s. Produced by `python benchmarks/fold_scales.py` "
             "(w4a16, group 128): CUDA-graph replays with the L2 cache flushed; percentages are the weights' bytes "
             "over time against the copy bandwidth; rel. error against float64 on the same weights.", "",
             "| layer | variant | us | of copy bandwidth | rel. error |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['variant']} | {r['t'] * 1e6:.1f} | {r['frac']:.0%} | {r['err']:.1e} |")
    path = write_results(args.out, "fold-scales", device, lines, dict(device=device, ceilings=ceil, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
