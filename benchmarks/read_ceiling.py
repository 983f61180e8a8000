"""How fast can a Triton kernel read batch-1 decode's int4 weights at all? A ceiling for the packed kernels.

For each one-row shape the engine runs on packed int4 weights (the one-token MoE's gate_up and down over their
slots' experts, R1's largest dense layers), a kernel that only reads the same int32 words, in the same program
layout (a slot's expert, BN weight rows, a K range of TW-word tiles), and XORs them into one word a row: plain
loads and, where Triton has them, the tensor memory accelerator's (a host TensorDescriptor). Beside it, the
engine's own kernels on the same shapes (w4a16, their default configurations). Replayed from a CUDA graph with the
L2 cache flushed (kernels.bench_graph); percentages are the words' bytes over the time against the copy bandwidth
measured in the same run. If the read alone reaches far more than the engine's kernels, their loss is in their
arithmetic or its schedule; if not, in how the reads are laid out.

    python benchmarks/read_ceiling.py [--out benchmarks/results] [--quick]
Writes read-ceiling-<device>-<date>.md (and .json).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernels import MOE_GEOMETRIES, bench_graph, ceilings, make_weight, one_token_moe  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit.kernels import matmul_packed as mp  # noqa: E402
from lowbit.kernels import moe  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton: plain loads only
    TensorDescriptor = None


@triton.jit
def _read_kernel(src, slot_ptr, out_ptr, N, stride_we, stride_wn, k_tiles, tiles,
                 BN: tl.constexpr, TW: tl.constexpr, MOE: tl.constexpr, TMA: tl.constexpr):
    """src: the words [E, N, KW] (plain loads) or a descriptor of them as [E * N, KW] with [BN, TW] blocks (TMA)."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = 0
    if MOE:
        e = tl.load(slot_ptr + slot).to(tl.int64)
    rows = pid_n * BN + tl.arange(0, BN)
    if TMA:
        row0 = (e * N + pid_n * BN).to(tl.int32)
    else:
        base = src + e * stride_we + rows[:, None].to(tl.int64) * stride_wn + tl.arange(0, TW)[None, :]
    acc = tl.zeros([BN, TW], dtype=tl.int32)
    t0 = pid_k * tiles
    for t in range(t0, tl.minimum(t0 + tiles, k_tiles)):
        if TMA:
            acc ^= src.load([row0, t * TW])
        else:
            acc ^= tl.load(base + t * TW)
    tl.store(out_ptr + (slot * tl.num_programs(2) + pid_k) * N + rows, tl.xor_sum(acc, axis=1))


def read_fn(words: torch.Tensor, slots: torch.Tensor | None, cfg: dict):
    """words [E, N, KW] int32; slots [S] expert ids (None: dense, expert 0) -> a launch of the read kernel."""
    E, N, KW = words.shape
    bn, tw, split = cfg["BN"], cfg["TW"], cfg["SPLIT"]
    k_tiles = KW // tw
    tiles = -(-k_tiles // split)
    s = 1 if slots is None else slots.numel()
    out = torch.empty(s * split * N, dtype=torch.int32, device=words.device)
    grid = (s, N // bn, split)
    dummy = out if slots is None else slots
    kw = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    tma = bool(cfg.get("TMA"))
    src = TensorDescriptor.from_tensor(words.view(E * N, KW), [bn, tw]) if tma else words
    return lambda: _read_kernel[grid](src, dummy, out, N, words.stride(0), words.stride(1), k_tiles, tiles,
                                      BN=bn, TW=tw, MOE=slots is not None, TMA=tma, **kw)


def configs(quick: bool) -> list[dict]:
    out = []
    tma = (False, True) if TensorDescriptor is not None else (False,)
    for t, bn, tw, split, stages in itertools.product(tma, (32, 64, 128), (32, 64), (1, 2, 4, 8), (1, 3)):
        if quick and (tw != 32 or stages != 3):
            continue
        out.append(dict(TMA=t, BN=bn, TW=tw, SPLIT=split, num_warps=4, num_stages=stages))
    return out


def timed(fn) -> float | None:
    try:
        return bench_graph(fn)
    except Exception as e:  # noqa: BLE001 - a configuration this chip or Triton cannot run
        print("  skipped:", type(e).__name__, str(e)[:160], flush=True)
        return None


DENSE = {"r1 o_proj": (7168, 16384), "r1 dense gate_up": (36864, 7168), "r1 dense down": (7168, 18432)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    ceil = ceilings()
    copy = ceil["copy_GBps"]
    print(f"{device}: copy {copy:.0f} GB/s", flush=True)
    cands = configs(args.quick)
    rows = []

    def pct(t, nbytes):
        return None if t is None else nbytes / t / 1e9 / copy

    def sweep(name, words, slots, engine: dict):
        nbytes = words[0].numel() * 4 * (1 if slots is None else slots.numel())
        res = []
        for cfg in cands:
            t = timed(read_fn(words, slots, cfg))
            res.append(dict(cfg=cfg, t=t, frac=pct(t, nbytes)))
        ok = [r for r in res if r["t"] is not None]
        best_plain = min((r for r in ok if not r["cfg"]["TMA"]), key=lambda r: r["t"])
        best_tma = min((r for r in ok if r["cfg"]["TMA"]), key=lambda r: r["t"], default=None)
        row = dict(layer=name, bytes=nbytes, sweep=res, best_plain=best_plain, best_tma=best_tma,
                   engine={k: dict(t=v[0], frac=pct(v[0], v[1])) for k, v in engine.items()})
        print(name, f"{nbytes / 1e6:.1f} MB", "plain", f"{best_plain['t'] * 1e6:.1f} us {best_plain['frac']:.0%}",
              best_plain["cfg"], "tma", best_tma and f"{best_tma['t'] * 1e6:.1f} us {best_tma['frac']:.0%}",
              best_tma and best_tma["cfg"],
              {k: f"{v['t'] * 1e6:.1f} us {v['frac']:.0%}" for k, v in row["engine"].items() if v["t"]}, flush=True)
        rows.append(row)

    g = torch.Generator(device="cuda").manual_seed(0)
    for geo, (E, H, inter, k, shared) in MOE_GEOMETRIES.items():
        w13, b13, w2, b2, ids = one_token_moe("w4a16", geo, g)
        kk = k + shared
        tw = torch.rand(1, kk, device="cuda")
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        t_moe = timed(functools.partial(moe.fused_moe, x, w13, w2, tw, ids))
        slots = ids.reshape(-1).contiguous()
        # the words as [E, N, K / 8] (their order within a row does not matter to a read)
        words13 = w13.weight.words.view(E + shared, 2 * inter, -1)
        words2 = w2.weight.words.view(E + shared, H, -1)
        sweep(f"{geo} MoE gate_up (1 token, {kk} slots)", words13, slots, {})
        sweep(f"{geo} MoE down (1 token, {kk} slots)", words2, slots,
              {"engine fused_moe (gate_up + down, all its launches)": (t_moe, kk * (b13 + b2))})
    for name, (N, K) in DENSE.items():
        pw, act, xs, nbytes = make_weight("w4a16", N, K)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        t = timed(functools.partial(mp.packed_matmul, x, pw, act, xs))
        sweep(name, pw.words.view(1, N, -1), None, {"engine packed_matmul": (t, nbytes)})

    def fmt(r):
        return "-" if r is None or r.get("t") is None else f"{r['t'] * 1e6:.1f} us ({r['frac']:.0%})"
    import datetime
    lines = [f"# Reading batch-1 decode's int4 weights: a ceiling for the packed kernels, {device}, "
             f"{datetime.date.today().isoformat()}", "",
             f"Copy bandwidth in this run: {copy:.0f} GB/s. Produced by `python benchmarks/read_ceiling.py"
             f"{' --quick' if args.quick else ''}`: a kernel that only reads the int4 words (XOR into one word a row) "
             "in the engine's program layout, each configuration replayed from a CUDA graph with the L2 cache "
             "flushed; percentages are bytes read over time against the copy bandwidth.", "",
             "| layer | MB | read, plain loads (best) | config | read, TMA loads (best) | config | engine |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    def cfg(r):
        return "" if r is None else {k: v for k, v in r["cfg"].items() if k != "TMA"}
    for r in rows:
        eng = "; ".join(f"{k}: {fmt(v)}" for k, v in r["engine"].items())
        lines.append(f"| {r['layer']} | {r['bytes'] / 1e6:.1f} | {fmt(r['best_plain'])} | {cfg(r['best_plain'])} | "
                     f"{fmt(r['best_tma'])} | {cfg(r['best_tma'])} | {eng} |")
    path = write_results(args.out, "read-ceiling", device, lines, dict(device=device, ceilings=ceil, rows=rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
