"""The fused MoE at one token with the down projection's K split over 1-4 programs per output tile (unpacked experts:
bf16, w8a8, fp8-block), replayed from a CUDA graph with the L2 cache flushed, as decode runs it; the experts' bytes
over the time against the copy bandwidth measured in the same run. The engine's default split is
`tuning.MOE_SPLIT_K` (env LOWBIT_MOE_SPLIT_K).

    python benchmarks/moe_split_k.py [--out benchmarks/results]
Writes moe-split-k-<device>-<date>.md there.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import bench_graph, ceilings, moe_experts  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import matmul_unpacked as mu  # noqa: E402
from lowbit.kernels import moe, tuning  # noqa: E402

GEOMETRIES = {"V2-Lite (64 x 2048x1408, top-6 + 2 shared)": (66, 2048, 1408, 8),
              "R1 (256 x 7168x2048, top-8 + 1 shared)": (257, 7168, 2048, 9)}


def experts(scheme: str, E: int, N: int, K: int):
    if scheme == "w8a8":
        w = torch.randint(-127, 128, (E, N, K), dtype=torch.int8, device="cuda")
        s = torch.rand(E, N, device="cuda") * 1e-3
        return moe.UnpackedExperts(w, mu.KIND_INT8_CHANNEL, s), N * K + N * 4
    return moe_experts(scheme, E, N, K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    ceil = ceilings()
    rows = []
    for gname, (E, H, inter, k) in GEOMETRIES.items():
        for scheme in ("bf16", "w8a8", "fp8-block"):
            w13, b13 = experts(scheme, E, 2 * inter, H)
            w2, b2 = experts(scheme, E, H, inter)
            topk = torch.randperm(E, device="cuda")[:k][None]
            tw = torch.rand(1, k, device="cuda")
            x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
            times = {}
            for split in (1, 2, 3, 4):
                tuning.MOE_SPLIT_K = split
                times[split] = bench_graph(lambda x=x, w13=w13, w2=w2, tw=tw, topk=topk:
                                           moe.fused_moe(x, w13, w2, tw, topk))
            nbytes = k * (b13 + b2)
            rows.append((gname, scheme, times, nbytes))
            print(gname, scheme, {s: f"{t * 1e6:.1f} us" for s, t in times.items()}, flush=True)
            w13 = w2 = None
            torch.cuda.empty_cache()
    copy = ceil["copy_GBps"]
    import datetime
    L = [f"# Fused MoE down-projection K splits at one token on {torch.cuda.get_device_name()}, "
         f"{datetime.date.today().isoformat()}", "",
         f"Copy bandwidth in this run: {copy:.0f} GB/s. Produced by `python benchmarks/moe_split_k.py`: `fused_moe` "
         "at one token with the engine's heuristic configuration, the down projection's K split 1-4 ways (the "
         "gate_up projection is never split: its SiLU needs whole sums).", "",
         "| geometry | scheme | split 1 | split 2 | split 3 | split 4 |", "| --- | --- | --- | --- | --- | --- |"]
    for gname, scheme, times, nbytes in rows:
        cells = [f"{t * 1e6:.1f} us ({nbytes / t / 1e9 / copy:.0%})" for t in times.values()]
        L.append(f"| {gname} | {scheme} | " + " | ".join(cells) + " |")
    device = torch.cuda.get_device_name()
    write_results(args.out, "moe-split-k", device, L, {"copy_GBps": copy, "rows": [
        {"geometry": g, "scheme": s, "us": {str(k): t * 1e6 for k, t in ts.items()}, "bytes": b}
        for g, s, ts, b in rows]})


if __name__ == "__main__":
    main()
