"""A target for Nsight Compute: the packed int4 kernel at one row, launched three times.

    ncu --clock-control none -k regex:_packed_matmul_kernel -s 2 -c 1 --section ... \
        python benchmarks/ncu_one_row.py oproj|gateup

oproj: R1's o_proj 7168 x 16384, paired, through matmul_packed.packed_matmul's default configuration. gateup: the
one-token MoE's gate_up over 9 slots of R1-sized paired experts (40 experts of 2 x 2048 x 7168), through
PackedExperts.run with moe.gate_up_config's configuration. What it found: ncu-packed-one-row-*-2026-11-25.txt.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.kernels import matmul_packed as mp  # noqa: E402
from lowbit.kernels import moe  # noqa: E402


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "oproj"
    torch.manual_seed(0)
    if which == "oproj":
        N, K = 7168, 16384
        v = torch.randint(-8, 8, (1, N, K), dtype=torch.int8, device="cuda")
        s = torch.rand(1, N, K // 128, device="cuda") * 0.01
        pw = mp.repack(v, s, None, 4, 128, paired=True)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            mp.packed_matmul(x, pw)
    else:
        E, H, inter = 40, 7168, 2048
        v = torch.randint(-8, 8, (E, 2 * inter, H), dtype=torch.int8, device="cuda")
        s = torch.rand(E, 2 * inter, H // 128, device="cuda") * 0.01
        w13 = moe.PackedExperts(mp.repack(v, s, None, 4, 128, paired=True))
        slots = torch.randperm(E, device="cuda")[:9].int()
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        inter_buf = torch.empty(9, inter, device="cuda", dtype=torch.bfloat16)
        cfg = moe.gate_up_config(w13.config(1, inter, H), True)
        for _ in range(3):
            w13.run(x, inter_buf, (None, slots), cfg, fuse_silu=True, x_row_div=9, slot_experts=slots)
    torch.cuda.synchronize()
    print("done", which)


if __name__ == "__main__":
    main()
