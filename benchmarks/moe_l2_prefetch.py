"""The one-token fused MoE with and without its gate_up launch asking L2 for the down projection's experts
(tuning.MOE_L2_PREFETCH): both projections of one token through packed experts, replayed from a CUDA graph with L2
flushed before each call (kernels.bench_graph), V2-Lite's and R1's experts, w4a16 and w4a8; the outputs compared bit
for bit (a prefetch changes no arithmetic).

    python benchmarks/moe_l2_prefetch.py [--out benchmarks/results]
Writes moe-l2-prefetch-<device>-<date>.md (and .json).
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

from lowbit.kernels import moe, tuning  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--runs", type=int, default=3, help="alternating timings of each setting")
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    copy = ceil["copy_GBps"]
    print(f"{device}: copy {copy:.0f} GB/s", flush=True)
    rows = []
    for geo in MOE_GEOMETRIES:
        for scheme in ("w4a16", "w4a8"):
            g = torch.Generator(device="cuda").manual_seed(0)
            w13, b13, w2, b2, ids = one_token_moe(scheme, geo, g)
            H = w13.shape[2]
            kk = ids.shape[1]
            x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
            weights = torch.rand(1, kk, device="cuda")

            def run(on: int, x=x, w13=w13, w2=w2, weights=weights, ids=ids):
                tuning.MOE_L2_PREFETCH = on
                return moe.fused_moe(x, w13, w2, weights, ids)
            same = torch.equal(run(0), run(1))
            times = {0: [], 1: []}
            for _ in range(args.runs):
                for on in (0, 1):
                    times[on].append(bench_graph(lambda on=on: run(on)))
            nbytes = kk * (b13 + b2)
            off, on = min(times[0]), min(times[1])
            row = dict(geometry=geo, scheme=scheme, slots=kk, bytes=nbytes, off_us=off * 1e6, on_us=on * 1e6,
                       off_frac=nbytes / off / 1e9 / copy, on_frac=nbytes / on / 1e9 / copy, same=same,
                       times_us={k: [t * 1e6 for t in v] for k, v in times.items()})
            rows.append(row)
            print(f"{geo} {scheme}: {nbytes / 1e6:.1f} MB, off {off * 1e6:.1f} us ({row['off_frac']:.0%}), "
                  f"on {on * 1e6:.1f} us ({row['on_frac']:.0%}), equal {same}", flush=True)
    tuning.MOE_L2_PREFETCH = 0
    lines = [f"# The one-token MoE's down-projection experts asked of L2 by its gate_up launch, {device}, "
             f"{datetime.date.today().isoformat()}", "",
             f"Copy bandwidth in this run: {copy:.0f} GB/s. Produced by `python benchmarks/moe_l2_prefetch.py`: "
             "moe.fused_moe on one token (both projections, packed experts in the engine's layout), replayed from a "
             f"CUDA graph with L2 flushed before each call, the best of {args.runs} alternating timings; percentages "
             "are both projections' weight bytes over time against the copy bandwidth.", "",
             "| geometry | scheme | slots | MB | without | with | ratio | outputs equal |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['geometry']} | {r['scheme']} | {r['slots']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['off_us']:.1f} us ({r['off_frac']:.0%}) | {r['on_us']:.1f} us ({r['on_frac']:.0%}) | "
                     f"{r['off_us'] / r['on_us']:.2f}x | {r['same']} |")
    path = write_results(args.out, "moe-l2-prefetch", device, lines, dict(device=device, ceilings=ceil, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
