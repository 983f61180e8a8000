"""Quantized GEMMs and the fused MoE on one GPU against cuBLAS bf16 and the roofline measured in the same run.

First the ceilings: copy bandwidth (a 2 GiB device-to-device copy, bytes read + written), the bf16 matrix rate
(cuBLAS, 8192^3) and the FP8 rate (torch._scaled_mm, 8192^3). Then, for DeepSeek-R1 layer shapes and
M = 1, 4, 16, 64, 256, 4096: each scheme's kernel time (median of CUDA-event timings, triton.testing.do_bench;
at decode sizes, M <= 64, replayed from a CUDA graph as decode runs it, cuBLAS too: launched eagerly, a product of
~80 us that takes two launches (w4a8: its rows on the FP8 grid, then the GEMM) measured 85-215 us on a busy host),
TFLOP/s, the bytes it must read (weights + scales + activations + output) over its time, and its speed-up over
cuBLAS bf16 on the same shape. Launch configurations are measured per M bucket first (tuning.autotune over
tuning.candidates, each screened with a short timing, the winner then timed in full), as the engine does at load time
with LOWBIT_AUTOTUNE=1 (without it, the heuristics of kernels/tuning.py). Last, the
fused MoE at R1 shapes (256 experts of 7168 x 2048, top-8) and V2-Lite shapes
(64 experts of 2048 x 1408, top-6) for 1 to 32 tokens, replayed from a CUDA graph as decode runs it: the bytes of
the experts the tokens reach over the time, against the copy bandwidth.

    python benchmarks/kernels.py [--quick] [--out benchmarks/results]
Writes kernels-<device>-<date>.md (and .json) there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_file import write_results  # noqa: E402

from lowbit.kernels import matmul_packed as mp
from lowbit.kernels import matmul_unpacked as mu
from lowbit.kernels import linear, moe, tuning

MS = [1, 4, 16, 64, 256, 4096]
SHAPES = {  # name -> (N, K) of DeepSeek-R1 layers
    "dense gate_up 36864x7168": (36864, 7168),
    "attn o_proj 7168x16384": (7168, 16384),
    "dense down 7168x18432": (7168, 18432),
}
SCHEMES = ["w4a16", "w4a8", "w4a8-int8", "w8a16", "w8a8", "fp8-block"]
TARGETS = {  # scheme -> (M range, metric, bound, text)
    "w4a16": ((1, 16), "speedup", 2.5, ">= 2.5x cuBLAS bf16 at M = 1..16"),
    "w4a8": ((1, 16), "speedup", 2.5, ">= 2.5x cuBLAS bf16 at M = 1..16"),
    "w8a16": ((1, 16), "speedup", 1.6, ">= 1.6x cuBLAS bf16 at M = 1..16"),
    "w8a8": ((4096, 4096), "speedup", 1.5, ">= 1.5x cuBLAS bf16 at M >= 4096"),
    "fp8-block": ((4096, 4096), "tflops", 1000.0, ">= 1000 TFLOP/s at M >= 4096 (and >= 1x bf16 at M = 1)"),
}


DECODE_M = 64  # up to this many rows the GEMMs are timed from a CUDA graph


def screen(fn) -> float:
    """A shorter timing that picks among candidate configurations; the winner is then timed in full (a cold run of
    the whole script must fit one 10-minute device call)."""
    return bench_graph(fn, reps=5, timings=3)


def screen_eager(fn) -> float:
    return bench(fn, rep=15)


def bench(fn, rep=60) -> float:
    """Median seconds of fn launched eagerly (triton.testing.do_bench, CUDA events)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e-3  # seconds


def bench_graph(fn, reps=20, timings=5) -> float:
    """Seconds per call of fn replayed from a CUDA graph, as the engine's decode runs it (no launch overhead), with
    the L2 cache flushed before each call: a 256 MiB read, timed alone in its own graph and subtracted. (A write
    flush leaves dirty lines that the timed kernel's reads then evict and write back: a 23 MB read took 11.2 us after
    a 256 MiB write and 9.7 us after a read, H100, 2026-11-24; small kernels looked slower than in the decode graph.)"""
    flush = torch.ones(256 << 20, dtype=torch.int8, device="cuda")
    flush_sum = torch.empty((), dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(with_fn: bool):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                torch.sum(flush, 0, dtype=torch.int32, out=flush_sum)
                if with_fn:
                    fn()
        return g

    def timed(g) -> float:
        times = []
        for _ in range(timings):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        return sorted(times)[timings // 2]
    both, alone = capture(True), capture(False)
    timed(both), timed(alone)
    return max(timed(both) - timed(alone), 0.0) / reps


def ceilings() -> dict:
    n = 1 << 30  # 1 Gi bf16 elements: 2 GiB
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = bench(lambda a=a, b=b: b.copy_(a))
    copy = 2 * a.numel() * 2 / t
    del a, b
    s = 8192
    x = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * s ** 3 / bench(lambda: x @ y)
    xf, yf = x.to(torch.float8_e4m3fn), y.t().contiguous().to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    fp8 = 2 * s ** 3 / bench(lambda: torch._scaled_mm(xf, yf, one, one, out_dtype=torch.bfloat16))
    return {"copy_GBps": copy / 1e9, "bf16_TFLOPs": bf16 / 1e12, "fp8_TFLOPs": fp8 / 1e12}


# ---------------------------------------------------------------------------------------------- weights
def make_weight(scheme: str, N: int, K: int):
    """(callable x -> y, weight bytes) for one scheme on an [N, K] layer with random contents."""
    dev = "cuda"
    if scheme in ("w4a16", "w4a8", "w4a8-int8", "w8a16"):
        bits = 8 if scheme == "w8a16" else 4
        group = 0 if bits == 8 else 128
        values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (1, N, K), dtype=torch.int8, device=dev)
        scale = torch.rand(1, N, 1 if group == 0 else K // group, device=dev) * 0.01
        pw = mp.repack(values, scale, None, bits, group)
        del values
        act = {"w4a8": mp.ACT_FP8_STATIC, "w4a8-int8": mp.ACT_INT8_TOKEN}.get(scheme, mp.ACT_NONE)
        in_scale = torch.tensor([0.01], device=dev)
        nbytes = pw.words.numel() * 4 + pw.scales.numel() * 2  # scales stored bf16 in the checkpoint
        return pw, act, in_scale, nbytes
    if scheme in ("w8a8", "w8a8-g32"):  # (w8a8-g32: --act-group-size 32)
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        kind = mu.KIND_INT8_G32 if scheme == "w8a8-g32" else mu.KIND_INT8_CHANNEL
        return w, kind, torch.rand(N, 1, device=dev) * 1e-3, N * K + N * 2
    w = (torch.randn(N, K, device=dev) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(N // 128, K // 128, device=dev) * 1e-3
    return w, mu.KIND_FP8_BLOCK, s, N * K + s.numel() * 4


def runner(scheme: str, weight, x: torch.Tensor):
    """x -> y closure taking a config (None: the tuned or heuristic one)."""
    if scheme in ("w4a16", "w4a8", "w4a8-int8", "w8a16"):
        pw, act, in_scale, _ = weight
        return lambda cfg=None: mp.packed_matmul(x, pw, act, in_scale, config=cfg), ("packed", pw.bits, act)
    w, kind, s, _ = weight
    return lambda cfg=None: mu.unpacked_matmul(x, w, kind, s, config=cfg), ("unpacked", kind)


def candidates(family: tuple, M: int, N: int, K: int) -> list[dict]:
    if family[0] == "packed":
        return tuning.candidates(True, M, K, family[1])
    return tuning.candidates(False, M, K, persistent=mu.persistent_ok(K, family[1]))


def gemm_table(ceil: dict, quick: bool) -> list[dict]:
    rows = []
    shapes = dict(list(SHAPES.items())[:1]) if quick else SHAPES
    for name, (N, K) in shapes.items():
        w_bf16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        weights = {s: make_weight(s, N, K) for s in SCHEMES}
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            timer, short = (bench_graph, screen) if M <= DECODE_M else (bench, screen_eager)
            t_ref = timer(lambda x=x, w=w_bf16: torch.nn.functional.linear(x, w))
            row = {"shape": name, "N": N, "K": K, "M": M, "cublas_us": t_ref * 1e6,
                   "cublas_GBps": (N * K + M * K + M * N) * 2 / t_ref / 1e9}
            flops = 2 * M * N * K
            for s in SCHEMES:
                fn, fam = runner(s, weights[s], x)
                cfg = tuning.autotune((name, s, tuning.bucket(M)), candidates(fam, M, N, K), fn, timer=short)
                t = timer(lambda fn=fn, cfg=cfg: fn(cfg))
                nbytes = weights[s][3] + M * K * 2 + M * N * 2
                row[s] = {"us": t * 1e6, "speedup": t_ref / t, "tflops": flops / t / 1e12,
                          "GBps": nbytes / t / 1e9, "config": cfg}
                if fam[0] == "packed" and M > linear.DEQUANT_ABOVE_ROWS:
                    # what the engine runs at this M: dequantize, then the matrix library on the scheme's
                    # activations (kernels/linear.py)
                    layer = linear.PackedLinear(*weights[s][:3])
                    t_eng = bench(lambda x=x, layer=layer: layer(x))
                    row[s]["engine_us"], row[s]["engine_speedup"] = t_eng * 1e6, t_ref / t_eng
            rows.append(row)
            print(f"{name} M={M}: cublas {t_ref * 1e6:.1f} us | " + " | ".join(
                f"{s} {row[s]['us']:.1f} us {row[s]['speedup']:.2f}x" for s in SCHEMES), flush=True)
        del w_bf16, weights
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- MoE
# the one-token MoE's shapes: name -> (routed experts, hidden, expert width, top-k, shared experts fused as more
# experts)
MOE_GEOMETRIES = {"v2lite": (64, 2048, 1408, 6, 2), "r1": (256, 7168, 2048, 8, 1)}


def one_token_moe(scheme: str, geometry: str, generator: torch.Generator):
    """A geometry's experts (routed and shared, stacked as the engine stacks them) in one scheme, and one token's
    routing: (gate_up experts, an expert's gate_up bytes, down experts, an expert's down bytes, topk_ids [1, slots]:
    top-k routed experts drawn from generator, then the shared ones)."""
    E, H, inter, k, shared = MOE_GEOMETRIES[geometry]
    w13, b13 = moe_experts(scheme, E + shared, 2 * inter, H)
    w2, b2 = moe_experts(scheme, E + shared, H, inter)
    ids = torch.cat([torch.randperm(E, device="cuda", generator=generator)[:k],
                     torch.arange(E, E + shared, device="cuda")])[None].int()
    return w13, b13, w2, b2, ids


def moe_experts(scheme: str, E: int, N: int, K: int):
    dev = "cuda"
    if scheme == "bf16":
        w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.02
        return moe.UnpackedExperts(w), N * K * 2
    if scheme in ("w8a8", "w8a8-g32"):
        w = torch.randint(-127, 128, (E, N, K), dtype=torch.int8, device=dev)
        kind = mu.KIND_INT8_G32 if scheme == "w8a8-g32" else mu.KIND_INT8_CHANNEL
        return moe.UnpackedExperts(w, kind, torch.rand(E, N, device=dev) * 1e-3), N * K + N * 4
    if scheme == "fp8-block":
        w = (torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 50).to(torch.float8_e4m3fn)
        s = torch.rand(E, N // 128, -(-K // 128), device=dev) * 1e-3
        return moe.UnpackedExperts(w, mu.KIND_FP8_BLOCK, s), N * K + s[0].numel() * 4
    bits = 8 if scheme == "w8a16" else 4
    group = 0 if bits == 8 else 128
    pw = None
    for e0 in range(0, E, 32):  # repack in slices: the int64 intermediates of a whole layer are large
        e1 = min(E, e0 + 32)
        values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (e1 - e0, N, K), dtype=torch.int8, device=dev)
        scale = torch.rand(e1 - e0, N, 1 if group == 0 else -(-K // group), device=dev) * 0.01
        part = mp.repack(values, scale, None, bits, group)
        if pw is None:
            pw = part
            words, scales = [part.words], [part.scales]
        else:
            words.append(part.words)
            scales.append(part.scales)
    pw.words, pw.scales = torch.cat(words), torch.cat(scales)
    act = {"w4a8": mp.ACT_FP8_STATIC, "w4a8-int8": mp.ACT_INT8_TOKEN}.get(scheme, mp.ACT_NONE)
    pw = mp.experts_layout(pw, act)  # (LOWBIT_INT4_PAIRED=1: the paired layout, as the engine's experts)
    per_expert = pw.words[0].numel() * 4 + pw.scales[0].numel() * 2
    return moe.PackedExperts(pw, act, torch.tensor([0.01], device=dev)), per_expert


def moe_candidates(scheme: str) -> list[dict]:
    out = []
    for bn in (32, 64, 128):
        for st in (3,):
            c = dict(BM=16, BN=bn, num_warps=4, num_stages=st)
            if scheme in ("bf16", "fp8-block", "w8a8"):
                c["BK"] = 64 if scheme == "bf16" else 128
            out.append(c)
    if scheme not in ("bf16", "fp8-block", "w8a8"):  # packed experts: the swapped product too (tuning.candidates)
        out += [dict(BM=16, BN=bn, num_warps=w, num_stages=3, SWAP=True) for bn, w in ((64, 4), (128, 8))]
    return out


def moe_table(ceil: dict, quick: bool) -> list[dict]:
    rows = []
    geoms = {"R1 (256 x 7168x2048, top-8)": (256, 7168, 2048, 8), "V2-Lite (64 x 2048x1408, top-6)": (64, 2048, 1408, 6)}
    schemes = ["bf16", "w4a16", "w4a8", "fp8-block"] if quick else ["bf16", "w4a16", "w4a8", "w4a8-int8",
                                                                     "w8a16", "w8a8", "fp8-block"]
    for gname, (E, H, inter, k) in geoms.items():
        for s in schemes:
            w13, b13 = moe_experts(s, E, 2 * inter, H)
            w2, b2 = moe_experts(s, E, H, inter)
            for T in (1, 4, 8, 16, 32):
                g = torch.Generator(device="cuda").manual_seed(T)
                topk = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
                tw = torch.rand(T, k, device="cuda")
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
                reached = topk.unique().numel()
                best = None
                for cfg in moe_candidates(s):
                    try:  # from a CUDA graph, as decode runs it: eager timing measured the launches
                        t = screen(lambda x=x, w13=w13, w2=w2, tw=tw, topk=topk, cfg=cfg:
                                   moe.fused_moe(x, w13, w2, tw, topk, config=cfg))
                    except Exception as e:  # noqa: BLE001 - a configuration this chip cannot run
                        print(f"  skipped {cfg}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best is None:
                    raise RuntimeError(f"no MoE configuration ran for {gname} {s} T={T}")
                cfg = best[1]
                t = bench_graph(lambda x=x, w13=w13, w2=w2, tw=tw, topk=topk, cfg=cfg:
                                moe.fused_moe(x, w13, w2, tw, topk, config=cfg))
                nbytes = reached * (b13 + b2)
                rows.append({"geometry": gname, "scheme": s, "tokens": T, "experts_reached": reached,
                             "us": t * 1e6, "GBps": nbytes / t / 1e9,
                             "of_copy": nbytes / t / 1e9 / ceil["copy_GBps"], "config": cfg})
                print(f"MoE {gname} {s} T={T}: {t * 1e6:.1f} us, {nbytes / t / 1e9:.0f} GB/s "
                      f"({rows[-1]['of_copy']:.0%} of copy)", flush=True)
            del w13, w2
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- report
def verdicts(rows: list[dict], moe_rows: list[dict] = ()) -> list[str]:
    lines = []
    for s, ((lo, hi), metric, bound, text) in TARGETS.items():
        vals = [(r[s][metric], r["M"], r["shape"]) for r in rows if lo <= r["M"] <= hi]
        if not vals:
            continue
        worst = min(vals)
        ok = worst[0] >= bound
        lines.append(f"| {s} | {text} | worst {worst[0]:.2f} (M={worst[1]}, {worst[2]}) | "
                     f"{'met' if ok else f'MISSED by {bound / worst[0]:.2f}x'} |")
    fp8_m1 = [r["fp8-block"]["speedup"] for r in rows if r["M"] == 1]
    if fp8_m1:
        lines.append(f"| fp8-block | never slower than bf16 at M = 1 | worst {min(fp8_m1):.2f}x | "
                     f"{'met' if min(fp8_m1) >= 1 else 'MISSED'} |")
    for s in dict.fromkeys(r["scheme"] for r in moe_rows):
        vals = [(r["of_copy"], r["tokens"]) for r in moe_rows if r["scheme"] == s and r["geometry"].startswith("R1")]
        if vals:
            worst = min(vals)
            lines.append(f"| fused MoE {s} | R1 experts, 1-32 tokens: >= 50% of copy bandwidth | worst "
                         f"{worst[0]:.0%} ({worst[1]} tokens) | "
                         f"{'met' if worst[0] >= 0.5 else f'MISSED by {0.5 / worst[0]:.2f}x'} |")
    return lines


def write(out_dir: str, device: str, ceil: dict, rows: list[dict], moe_rows: list[dict]) -> str:
    date = datetime.date.today().isoformat()
    L = [f"# lowbit kernels on {device}, {date}", "",
         f"torch {torch.__version__}, triton {__import__('triton').__version__}. Produced by "
         "`python benchmarks/kernels.py` in one run.", "",
         "## Ceilings measured in this run", "",
         f"- copy bandwidth: {ceil['copy_GBps']:.0f} GB/s (2 GiB device-to-device copy, read + write)",
         f"- bf16 matmul (cuBLAS, 8192^3): {ceil['bf16_TFLOPs']:.0f} TFLOP/s",
         f"- FP8 matmul (torch._scaled_mm, 8192^3): {ceil['fp8_TFLOPs']:.0f} TFLOP/s", "",
         "## Targets", "", "| scheme | target | measured | verdict |", "| --- | --- | --- | --- |",
         *verdicts(rows, moe_rows),
         "", "## GEMMs: time (us) and speed-up over cuBLAS bf16 on the same shape", "",
         "Bandwidth counts the bytes a kernel must read and write (weights with their scales, activations, "
         "output) over its time; cuBLAS's column counts its bf16 weights the same way. Up to M = "
         f"{DECODE_M} every column (cuBLAS's too) is replayed from a CUDA graph with the L2 cache flushed, as decode "
         "runs it; larger M are timed by launching (triton.testing.do_bench).", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        L += [f"### {shape}", "", "| M | cuBLAS bf16 | " + " | ".join(SCHEMES) + " |",
              "| --- | --- | " + " | ".join("---" for _ in SCHEMES) + " |"]
        for r in (r for r in rows if r["shape"] == shape):
            L.append(f"| {r['M']} | {r['cublas_us']:.1f} us, {r['cublas_GBps']:.0f} GB/s | " + " | ".join(
                f"{r[s]['us']:.1f} us, **{r[s]['speedup']:.2f}x**, {r[s]['tflops']:.0f} TF/s, "
                f"{r[s]['GBps']:.0f} GB/s" + (f"; engine (dequantize + cuBLAS) {r[s]['engine_us']:.1f} us, "
                                             f"**{r[s]['engine_speedup']:.2f}x**" if "engine_us" in r[s] else "")
                for s in SCHEMES) + " |")
        L.append("")
    if moe_rows:
        L += ["## Fused MoE: bytes of the experts reached over the time", "",
              "Each call replayed from a CUDA graph (as decode runs it), the L2 cache flushed before each.", "",
              "| geometry | scheme | tokens | experts reached | time | GB/s | of copy bandwidth |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in moe_rows:
            L.append(f"| {r['geometry']} | {r['scheme']} | {r['tokens']} | {r['experts_reached']} | "
                     f"{r['us']:.1f} us | {r['GBps']:.0f} | {r['of_copy']:.0%} |")
        L.append("")
    return write_results(out_dir, "kernels", device, L,
                         {"device": device, "date": date, "ceilings": ceil, "gemm": rows, "moe": moe_rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one GEMM shape and four MoE schemes")
    ap.add_argument("--no-moe", action="store_true")
    ap.add_argument("--no-gemm", action="store_true", help="the fused MoE table only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    ceil = ceilings()
    print(json.dumps(ceil), flush=True)
    rows = [] if args.no_gemm else gemm_table(ceil, args.quick)
    os.makedirs(args.out, exist_ok=True)
    if rows and not args.no_moe:  # the GEMMs kept should the MoE part not finish (rewritten with both below)
        write(args.out, device, ceil, rows, [])
    t1 = time.perf_counter()
    moe_rows = [] if args.no_moe else moe_table(ceil, args.quick)
    print(f"ceilings and GEMMs {t1 - t0:.0f} s, MoE {time.perf_counter() - t1:.0f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = write(args.out, device, ceil, rows, moe_rows)
    with open(path) as f:
        print(f.read())


if __name__ == "__main__":
    main()
