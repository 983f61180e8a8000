"""Launch configurations per shape range, chosen at load time and never compiled per request.

M (tokens) is bucketed: 1, 2-4, 5-16, 17-64, 65-256, larger. For each bucket a heuristic gives a configuration
from N, K and the chip's multiprocessor count; `autotune` measures a few candidates per bucket for the shapes of a
loaded model and records the fastest in TUNED, which the heuristics consult first. The engine's warm-up then
compiles every bucket once, before the first request.
"""
from __future__ import annotations

import functools

import torch

from lowbit.kernels import cdiv

M_BUCKETS = (1, 4, 16, 64, 256, 1 << 30)
TUNED: dict[tuple, dict] = {}  # (kernel, m bucket, n, k, variant) -> config


def bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


@functools.cache
def num_sms() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).multi_processor_count
    return 8


def _split_k(programs: int, k_tiles: int) -> int:
    """Enough K splits (dividing the K tiles evenly) that the chip has about two programs per multiprocessor."""
    split = 1
    while programs * split < 2 * num_sms() and k_tiles % (split * 2) == 0 and split * 2 <= k_tiles // 2:
        split *= 2
    return split


def packed_config(m: int, n: int, k: int, bits: int, act: int, moe: bool = False) -> dict:
    b = bucket(m)
    key = ("packed", b, n, k, bits, act, moe)
    if key in TUNED:
        return TUNED[key]
    tile_k = 256 if bits == 4 else 128
    # shared memory stays under Hopper's 227 KB per block (benchmarks/kernel_sass.py and tests/kernels/test_sass.py
    # compile these for sm_90a)
    if b <= 16:
        cfg = {"BM": 16, "BN": 64 if n >= 8192 else 32, "num_warps": 4, "num_stages": 3}
    elif b <= 64:
        cfg = {"BM": 32 if b <= 32 else 64, "BN": 64, "num_warps": 4, "num_stages": 3}
    elif b <= 256:
        cfg = {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 3}
    else:  # 128 x 128 spills registers (eight unrolled planes); 128 x 64 does not
        cfg = {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3}
    if not moe and b <= 64:
        cfg["SPLIT_K"] = _split_k(cdiv(m, cfg["BM"]) * cdiv(n, cfg["BN"]), cdiv(k, tile_k))
    return cfg


def unpacked_config(m: int, n: int, k: int, kind: int, moe: bool = False) -> dict:
    b = bucket(m)
    key = ("unpacked", b, n, k, kind, moe)
    if key in TUNED:
        return TUNED[key]
    if b <= 16:
        cfg = dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4)
    elif b <= 64:
        cfg = dict(BM=64, BN=64, BK=128, num_warps=4, num_stages=4)
    else:
        cfg = dict(BM=128, BN=128, BK=128 if kind else 64, num_warps=8, num_stages=4)
    if not moe and b <= 64:
        cfg["SPLIT_K"] = _split_k(cdiv(m, cfg["BM"]) * cdiv(n, cfg["BN"]), cdiv(k, cfg["BK"]))
    return cfg


def autotune(key: tuple, candidates: list[dict], run) -> dict:
    """Time `run(config)` for each candidate (median of CUDA-event timings) and record the fastest under key."""
    import triton.testing
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a configuration the chip cannot run (too much shared memory, say) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no candidate configuration ran for {key}")
    TUNED[key] = best
    return best
