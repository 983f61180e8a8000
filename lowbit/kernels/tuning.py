"""Launch configurations per shape range, chosen at load time and never compiled per request.

M (tokens) is bucketed: 1, 2-4, 5-16, 17-64, 65-256, larger. For each bucket a heuristic gives a configuration
from N, K and the chip's multiprocessor count; `autotune` measures a few candidates per bucket for the shapes of a
loaded model and records the fastest in TUNED, which the heuristics consult first. The engine's warm-up then
compiles every bucket once, before the first request.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from lowbit.kernels import cdiv
from lowbit.kernels import matmul_unpacked as mu

M_BUCKETS = (1, 4, 16, 64, 256, 1 << 30)
TUNED: dict[tuple, dict] = {}  # (kernel, m bucket, n, k, variant) -> config
log = logging.getLogger(__name__)


def bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def env_count(name: str, default: int = 0) -> int:
    """A non-negative whole number from the environment variable `name` (unset or empty: default, 0 the heuristic's
    choice); anything else stops with a line naming the variable."""
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isdigit():
        raise ValueError(f"{name}={raw!r}: expected a whole number >= 0 (0 or unset: the heuristic's choice)")
    return int(raw)


@functools.cache
def num_sms() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).multi_processor_count
    return 8


# K splits of the fused MoE's down projection for one token (moe.one_token_down_split): each of its few experts'
# programs runs one long K loop, latency-bound; splits put more programs in flight, their partial sums added by the
# slots' sum (rows.store_slot_sum) with no launch of their own. LOWBIT_MOE_SPLIT_K=N forces N for every scheme; unset,
# packed experts split in two where their programs fill under two waves of the chip (V2-Lite's 8 slots x 32 column
# blocks), large unpacked experts of the kinds in LARGE_UNPACKED_DOWN_SPLITS as it says, the rest stay whole. H100,
# 2026-11-25 (moe-split-k-h100-80gb-hbm3-2026-11-25.md), batch-1 decode graph, PDL: V2-Lite's w4a16 MoE layer
# 66.9 -> 62.9 us at 2, bf16's 97.9 -> 99.6; isolated, R1's int4 experts lost 3-6% at 2. (Through a zeroed float32
# output, atomics and a float32 moe_sum every split lost: the 2026-11-24 file.)
MOE_SPLIT_K = env_count("LOWBIT_MOE_SPLIT_K")
# large experts: an expert's projection of this many weights or more (R1's 2048 x 7168 and 7168 x 2048, where
# V2-Lite's are 1408 x 2048 and 2048 x 1408); the one-token MoE's rules below differ for the two, each measured at both
LARGE_EXPERT = 8 << 20
# pipeline stages of the one-token MoE's paired int4 experts: two where large, three below; LOWBIT_MOE_STAGES=N forces
# N. H100, 2026-11-25 (packed-sweep-moe-h100-80gb-hbm3-2026-11-25*.md, two runs, isolated): R1 gate_up 64.1 -> 61.2
# and 64.2 -> 61.3 us at two, down 37.0 -> 34.5; V2-Lite's gate_up 14.5-14.7 -> 16.1-16.7. In the decode graph R1's
# MoE layer 2.4% faster, w4a16 and w4a8 (layer-ratio-r1-...-2026-11-25-session17-moe-stages.md)
MOE_STAGES = env_count("LOWBIT_MOE_STAGES")
# w4a8's packed experts at one token: the gate_up launch writes the down projection's input on its experts' static
# FP8 grids (the values act_quant.fp8_grid_rows gives), saving that launch; LOWBIT_W4A8_FUSED=0 keeps it. (The gate_up
# input quantized by each gate_up program instead of its launch compiled 1.7x the main loop's instructions, Triton
# 3.6, sm_90a, even with one row quantized a program: not taken)
W4A8_FUSED = env_count("LOWBIT_W4A8_FUSED", 1)
# the one-token down projection's K splits of large unpacked experts, by kind (the others stay whole). H100,
# 2026-11-25, R1 decode graph (layer-ratio-r1-...-2026-11-25-session17-unpacked-splits.md): the MoE layer w8a16
# 295.3 -> 287.4 us at two, fp8-block 288.1 -> 280.1 at three; isolated bf16 and w8a8 lost 1-3% to any split
# (moe-split-k-h100-80gb-hbm3-2026-11-25.md)
LARGE_UNPACKED_DOWN_SPLITS = {mu.KIND_INT8_W16: 2, mu.KIND_FP8_BLOCK: 3}


def _split_k(programs: int, k_tiles: int) -> int:
    """Enough K splits (dividing the K tiles evenly) that the chip has about two programs per multiprocessor."""
    split = 1
    while programs * split < 2 * num_sms() and k_tiles % (split * 2) == 0 and split * 2 <= k_tiles // 2:
        split *= 2
    return split


def packed_config(m: int, n: int, k: int, bits: int, act: int, moe: bool = False, paired: bool = False) -> dict:
    b = bucket(m)
    key = ("packed", b, n, k, bits, act, moe)
    if key in TUNED:
        return TUNED[key]
    tile_k = 256 if bits == 4 else 128
    # shared memory stays under Hopper's 227 KB per block (benchmarks/kernel_sass.py and tests/kernels/test_sass.py
    # compile these for sm_90a)
    if b <= 16:
        cfg = {"BM": 16, "BN": 64 if n >= 8192 else 32, "num_warps": 4, "num_stages": 3}
        if moe and (n > k or b > 1):
            # the MoE's down projection (more outputs than inputs), and either projection from two slots an expert:
            # 64 columns (H100, 2026-11-23, benchmarks/moe_configs.py: 11.7 vs 12.5 us V2-Lite down at one token,
            # 42.9 vs 47.6 at eight; R1 w4a8 down 49.8 vs 61.1 us); one slot's gate_up keeps 32 (21.9 vs 26.1 us)
            cfg["BN"] = 64
        if paired:
            # paired int4 experts and dense layers (packed_layout.pair): 64 weight rows a program, the weights the first
            # operand (one warpgroup MMA's 64 rows), where their main loop compiles shortest (Triton 3.6, sm_90a,
            # V2-Lite experts, `benchmarks/kernel_sass.py --paired`: gate_up 3.1 instructions a weight against 4.9 for
            # the planar 32-row default, down 3.5 against 4.5); on an H100 the one-token MoE 33.0 -> 27.1 us (w4a16),
            # 41.7 -> 36.4 (w4a8), moe-configs-paired-h100-80gb-hbm3-2026-11-24.md, which found no better candidate
            cfg.update(BN=64, SWAP=True)
            if moe and b == 1:
                cfg["num_stages"] = MOE_STAGES or (2 if n * k >= LARGE_EXPERT else 3)
    elif b <= 64 and moe and paired:
        # a large decode batch's paired experts (V2-Lite at 256 tokens: 32 rows an expert, the shared experts every
        # token): 32 rows a block, the weights the first operand, 128 weight rows on eight warps (the gate_up launch
        # takes 64 outputs of 128 rows: gate_up_config). H100, 2026-11-25, moe-configs-paired-...-session18-batch.md:
        # gate_up 404.6 -> 123.2 us, down 225.5 -> 73.7 against {BM 64, BN 64, four warps}, which read 16% of copy
        cfg = {"BM": 32, "BN": 128, "num_warps": 8, "num_stages": 3, "SWAP": True}
    elif b <= 64:
        cfg = {"BM": 32 if b <= 32 else 64, "BN": 64, "num_warps": 4, "num_stages": 3}
    elif b <= 256:
        cfg = {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 3}
    else:  # 128 x 128 spills registers (eight unrolled planes); 128 x 64 does not
        cfg = {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3}
    k_tiles = cdiv(k, tile_k)
    if not moe and b <= 16 and k_tiles % 4 == 0:
        # dense, decode rows: 64 columns in four K splits, int4 swapped, what autotuning picked on every R1 shape at
        # M = 1..16 (benchmarks/kernels.py, H100, 2026-11-24, kernels-h100-80gb-hbm3-2026-11-24.json: o_proj 7168 x
        # 16384 at M = 1 39.5 us, against 46.8 us for the 32-column, two-split heuristic in the decode graph)
        cfg.update(BN=64, SPLIT_K=4, **({"SWAP": True} if bits == 4 else {}))
    elif not moe and b <= 64:
        cfg["SPLIT_K"] = _split_k(cdiv(m, cfg["BM"]) * cdiv(n, cfg["BN"]), k_tiles)
    return cfg


def gemv_config(n: int, k: int, bits: int, moe_rows: int = 0, fuse_silu: bool = False) -> dict:
    """The one-row packed GEMV's launch (gemv_packed.py): BN output rows a program (gate and up rows both where
    fused), over TILES K tiles (a dense layer splits its K in two-tile parts: one load's latency a program, not a
    chain of them; the MoE's projections keep the whole K, whose split's partial-sum traffic measured slower).
    From benchmarks/gemv.py (H100, 2026-11-24, gemv-h100-80gb-hbm3-2026-11-24-*.md), where the spread between runs
    (about 10%) is as large as that between the better configurations."""
    key = ("gemv", n, k, bits, moe_rows, fuse_silu)
    if key in TUNED:
        return TUNED[key]
    if not moe_rows:
        return {"BN": 16, "TILES": 2, "num_warps": 4}
    if fuse_silu:
        return {"BN": 8, "num_warps": 4}
    return {"BN": 32, "num_warps": 4}


def unpacked_config(m: int, n: int, k: int, kind: int, moe: bool = False) -> dict:
    kind = mu.kernel_kind(kind)  # (w8a8's activation groups run w8a16's product)
    b = bucket(m)
    split_columns = None  # the columns a block the K split is sized for (None: the block's)
    key = ("unpacked", b, n, k, kind, moe)
    if key in TUNED:
        return TUNED[key]
    if b <= 16:
        cfg = dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4)
    elif b <= 64 and moe and kind == mu.KIND_BF16:
        # the MoE's bf16 experts at 17-64 rows each: 32 rows a block (H100, 2026-11-25, V2-Lite bf16 at 256 tokens,
        # moe-configs-paired-...-session18-batch.md: gate_up 300.4 -> 274.2 us, down 166.7 -> 148.0 against BM 64)
        cfg = dict(BM=32, BN=64, BK=128, num_warps=4, num_stages=4)
    elif b <= 64 and not moe and kind == mu.KIND_INT8_W16:
        # dense int8 weights on the 16-bit tensor cores (w8a16; w8a8's activation groups) at 17-64 rows: 128 columns
        # a block in three stages (H100, 2026-11-25, w8a8-groups-...-sweep64.md, R1's shapes at 64 rows, heuristic
        # split: 36864x7168 182.7 -> 166.2 us, 7168x16384 85.4 -> 64.5, 7168x18432 94.9 -> 71.8; four stages
        # lost: 199.3 / 86.3 / 95.3); K split as for 64 columns a block (the split for 128 columns, twice that on
        # 7168 rows, measured 78.0 and 86.5 us on the last two)
        cfg = dict(BM=64, BN=128, BK=128, num_warps=4, num_stages=3)
        split_columns = 64
    elif b <= 64:
        cfg = dict(BM=64, BN=64, BK=128, num_warps=4, num_stages=4)
    elif not moe and b > 256 and kind == mu.KIND_FP8_BLOCK and mu.persistent_ok(k, kind):
        # dense fp8-block prefill: the persistent kernel with the tensor memory accelerator's loads (H100,
        # 2026-11-24, kernels-h100-80gb-hbm3-2026-11-24.md, M = 4096: 536-585 -> 701-824 TFLOP/s on R1's shapes);
        # int8 measured faster tiled (autotuning picked the tiled kernel on all three shapes), so it stays below
        cfg = dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=4, PERSISTENT=True)
    else:
        # int8 (w8a8): three stages, whose 96 KB of shared memory let two blocks share a multiprocessor (H100,
        # 2026-11-24, benchmarks/large_m.py, M = 4096: 1.30 -> 1.55x cuBLAS on 36864x7168, 0.92 -> 1.37x on
        # 7168x18432); bf16 and fp8-block measured no better with three
        cfg = dict(BM=128, BN=128, BK=128 if kind else 64, num_warps=8, num_stages=3 if kind == 1 else 4)
    if not moe and b <= 64:
        cfg["SPLIT_K"] = _split_k(cdiv(m, cfg["BM"]) * cdiv(n, split_columns or cfg["BN"]), cdiv(k, cfg["BK"]))
    return cfg


def _time(fn) -> float:
    """Median seconds of fn: CUDA events on a GPU, the host clock elsewhere (Triton's interpreter, for tests)."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e-3
    import time
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[1]


def autotune(key: tuple, candidates: list[dict], run, timer=None) -> dict:
    """Time `run(config)` for each candidate (with `timer(fn) -> seconds`, _time by default) and record the fastest
    under key (what the *_config functions read)."""
    best, best_t = None, float("inf")
    for cfg in candidates:
        try:
            t = (timer or _time)(lambda cfg=cfg: run(cfg))
        except Exception as e:  # noqa: BLE001 - a configuration this chip cannot run (shared memory, say)
            log.debug("config %s skipped for %s: %s", cfg, key, e)
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"no candidate configuration ran for {key}")
    TUNED[key] = best
    return best


def candidates(packed: bool, m: int, k: int, bits: int = 8, persistent: bool = False) -> list[dict]:
    """A few launch configurations for one M bucket (each is a compilation: a handful keeps start-up short); all
    within Hopper's shared memory and unspilled (benchmarks/kernel_sass.py). persistent: a dense int8 / fp8-block
    layer that matmul_unpacked's persistent kernel takes (persistent_ok)."""
    k_tiles = cdiv(k, (256 if bits == 4 else 128) if packed else 128)
    extra = {} if packed else {"BK": 128}
    if m <= 16:
        if packed:
            # the plain and the swapped product (W @ x^T: the dequantized weights stay in registers as the first
            # operand of Hopper's warpgroup MMA). Over two full kernels.py runs (H100, 2026-11-24, R1's three shapes,
            # M = 1..16, four packed schemes) 64 columns in four K splits won every time, swapped 53 of 72; 128
            # columns, one split with 64, and eight swapped warps never: dropped (fewer compilations at start-up)
            tiles = ((32, 1), (64, 1)) if k_tiles % 4 else ((64, 4),)
            return [dict(BM=16, BN=bn, SPLIT_K=split, num_warps=4, num_stages=3, **swap)
                    for bn, split in tiles for swap in ({}, {"SWAP": True})]
        return [dict(BM=16, BN=bn, SPLIT_K=split, num_warps=4, num_stages=4, **extra)
                for bn, split in ((32, 1), (64, 1), (128, 1), (64, 4), (128, 4)) if k_tiles % split == 0]
    if m <= 256:
        return [dict(BM=bm, BN=bn, num_warps=w, num_stages=3, **extra) for bm, bn, w in ((32, 64, 4), (64, 128, 8))] + \
            ([dict(BM=64, BN=128, num_warps=8, num_stages=3, SWAP=True)] if packed else [])
    if packed:
        return [dict(BM=bm, BN=bn, num_warps=8, num_stages=3) for bm, bn in ((128, 64), (64, 128))] + \
            [dict(BM=64, BN=128, num_warps=8, num_stages=3, SWAP=True)]
    return [dict(BM=128, BN=128, num_warps=8, num_stages=st, **extra) for st in (3, 4)] + \
        ([dict(BM=128, BN=128, num_warps=8, num_stages=st, PERSISTENT=True, **extra) for st in (3, 4)]
         if persistent else [])


def tune_model(model: torch.nn.Module, max_tokens: int, dtype: torch.dtype) -> dict:
    """Measure the candidates of every M bucket up to max_tokens for each distinct kernel layer shape of a loaded
    model (the routed experts keep the heuristics) and record the winners; returns {key: config}."""
    from lowbit.kernels import matmul_packed as mp
    from lowbit.kernels.linear import PackedLinear, UnpackedLinear
    chosen = {}
    for module in model.modules():
        kern = getattr(module, "_kernel", None)
        if not isinstance(kern, (PackedLinear, UnpackedLinear)):
            continue
        for b in M_BUCKETS:
            m = min(b, 1024)
            if (m > max_tokens and b != 1) or kern.runs_dequantized(m):  # (the matrix library's rows: no kernel)
                break
            if isinstance(kern, PackedLinear):
                w = kern.weight
                key = ("packed", b, w.n, w.k, w.bits, kern.act, False)
                x = torch.randn(m, w.k, dtype=dtype, device=w.words.device)

                def run(cfg, x=x, kern=kern):
                    return mp.packed_matmul(x, kern.weight, kern.act, kern.input_scale, config=cfg)
                cands = candidates(True, m, w.k, w.bits)
            else:
                n, k = kern.weight.shape
                key = ("unpacked", b, n, k, mu.kernel_kind(kern.kind), False)
                x = torch.randn(m, k, dtype=dtype, device=kern.weight.device)

                def run(cfg, x=x, kern=kern):
                    return mu.unpacked_matmul(x, kern.weight, kern.kind, kern.scale, config=cfg)
                cands = candidates(False, m, k, persistent=mu.persistent_ok(k, kern.kind))
            if key not in TUNED:
                chosen[key] = autotune(key, cands, run)
    return chosen
