"""The fused MoE at one token with the down projection's K split over 1-4 programs per output tile (every scheme's
experts as the engine stacks them: unpacked bf16, w8a8, w8a16, fp8-block; packed int4 w4a16 and w4a8 in the paired
layout, whose split is the largest divisor of their K tiles at most the one asked), the splits' partial sums added
by the slots' sum (rows.store_slot_sum), replayed from a CUDA graph with the L2 cache flushed, as decode runs it; the
experts' bytes over the time against the copy bandwidth measured in the same run. The engine's default split is
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
    if scheme in ("w8a8", "w8a16"):
        w = torch.randint(-127, 128, (E, N, K), dtype=torch.int8, device="cuda")
        s = torch.rand(E, N, device="cuda") * 1e-3
        kind = mu.KIND_INT8_CHANNEL if scheme == "w8a8" else mu.KIND_INT8_W16
        return moe.UnpackedExperts(w, kind, s), N * K + N * 4
    return moe_experts(scheme, E, N, K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    ceil = ceilings()
    rows = []
    for gname, (E, H, inter, k) in GEOMETRIES.items():
        for scheme in ("bf16", "w8a8", "w8a16", "fp8-block", "w4a16", "w4a8"):
            w13, b13 = experts(scheme, E, 2 * inter, H)
            w2, b2 = experts(scheme, E, H, inter)
            topk = torch.randperm(E, device="cuda")[:k][None]
            tw = torch.rand(1, k, device="cuda")
            x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
            times = {}
            for split in (1, 2, 3, 4):
                tuning.MOE_SPLIT_K = split
                cfg2 = w2.config(1, H, inter)
                taken = moe.one_token_down_split(w2, inter, cfg2, k)
                t = bench_graph(lambda x=x, w13=w13, w2=w2, tw=tw, topk=topk: moe.fused_moe(x, w13, w2, tw, topk))
                times[split] = (t, taken)
            nbytes = k * (b13 + b2)
            rows.append((gname, scheme, times, nbytes))
            print(gname, scheme, {s: f"{t * 1e6:.1f} us (split {k})" for s, (t, k) in times.items()}, flush=True)
            w13 = w2 = None
            torch.cuda.empty_cache()
    copy = ceil["copy_GBps"]
    import datetime
    L = [f"# Fused MoE down-projection K splits at one token on {torch.cuda.get_device_name()}, "
         f"{datetime.date.today().isoformat()}", "",
         f"Copy bandwidth in this run: {copy:.0f} GB/s. Produced by `python benchmarks/moe_split_k.py`: `fused_moe` "
         "at one token with the engine's heuristic configuration, the down projection's K split 1-4 ways (the "
         "gate_up projection is never split: its SiLU needs whole sums), the splits added by the slots' sum; packed "
         "experts take the largest divisor of their K tiles at most the split asked (in brackets where it differs).",
         "",
         "| geometry | scheme | split 1 | split 2 | split 3 | split 4 |", "| --- | --- | --- | --- | --- | --- |"]
    for gname, scheme, times, nbytes in rows:
        cells = [f"{t * 1e6:.1f} us ({nbytes / t / 1e9 / copy:.0%})" + (f" [{k}]" if k != s else "")
                 for s, (t, k) in times.items()]
        L.append(f"| {gname} | {scheme} | " + " | ".join(cells) + " |")
    device = torch.cuda.get_device_name()
    write_results(args.out, "moe-split-k", device, L, {"copy_GBps": copy, "rows": [
        {"geometry": g, "scheme": s, "us": {str(k): t * 1e6 for k, (t, _) in ts.items()},
         "split_taken": {str(k): taken for k, (_, taken) in ts.items()}, "bytes": b}
        for g, s, ts, b in rows]})


if __name__ == "__main__":
    main()
