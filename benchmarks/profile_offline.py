"""Where offline throughput's time goes on one GPU: many requests at once (e2e.py's offline step: 256 requests of 512
tokens in), on a V2-Lite-geometry model with fewer layers (random weights), per scheme in one run: the wall time of
the prefill alone (one output token) and of the whole generation, and for each the GPU time by kernel
(torch.profiler), so the decode steps' share is the difference. What e2e.py reports as one offline rate, split.

    python benchmarks/profile_offline.py [--schemes bf16,w4a16] [--layers 4] [--requests 256] [--out DIR]
Writes profile-offline-<device>-<date>.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_random_checkpoint as mrc  # noqa: E402
from e2e import best  # noqa: E402
from results_file import write_results  # noqa: E402

from lowbit import LLM, SamplingParams  # noqa: E402


def kernels(fn) -> tuple[dict, int]:
    """({kernel: GPU us}, launches) of fn, run once under torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times, launches = collections.Counter(), 0
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            times[e.key] += e.self_device_time_total
            launches += e.count
    return times, launches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", default="bf16,w4a16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=64, help="output tokens a request")
    ap.add_argument("--work", default="/tmp/profile-offline")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    device = torch.cuda.get_device_name()
    cfg = dict(mrc.GEOMETRIES["v2-lite"], num_hidden_layers=args.layers)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(100, cfg["vocab_size"] - 100, (args.prompt,), generator=g).tolist()
               for _ in range(args.requests)]
    lines = [f"# Offline throughput by phase and kernel: V2-Lite geometry, {args.layers} layers, {device}, "
             f"{datetime.date.today().isoformat()}", "",
             f"Produced by `python benchmarks/profile_offline.py --schemes {args.schemes} --layers {args.layers} "
             f"--requests {args.requests} --prompt {args.prompt} --output {args.output}`: the engine as e2e.py "
             "configures it (max_num_seqs 256, max_num_batched_tokens 16384, CUDA graphs), each generation timed "
             "(best of two) and profiled once; GPU time is the kernels' own time summed.", "",
             "| scheme | prefill wall (s) | prefill GPU (s) | whole wall (s) | whole GPU (s) | decode wall (s) | "
             "decode GPU (s) | decode steps | ms a step, wall | ms a step, GPU | launches a step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    tables, data = [], {}
    for scheme in args.schemes.split(","):
        path = os.path.join(args.work, f"v2-lite-{args.layers}l-{scheme}")
        if not os.path.exists(os.path.join(path, "config.json")):
            mrc.write(cfg, path, scheme, device="cuda", progress=False)
        llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=256, max_model_len=1024,
                  max_num_batched_tokens=16384, kv_cache_memory_gb=12)
        llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up

        def gen(n, llm=llm):
            return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        pre_wall, all_wall = best(lambda: gen(1)), best(lambda: gen(args.output + 1))
        pre_k, pre_n = kernels(lambda: gen(1))
        all_k, all_n = kernels(lambda: gen(args.output + 1))
        dec = {k: all_k[k] - pre_k.get(k, 0) for k in all_k}
        steps = args.output
        pre_gpu, all_gpu = sum(pre_k.values()) * 1e-6, sum(all_k.values()) * 1e-6
        dec_wall, dec_gpu = all_wall - pre_wall, all_gpu - pre_gpu
        lines.append(f"| {scheme} | {pre_wall:.3f} | {pre_gpu:.3f} | {all_wall:.3f} | {all_gpu:.3f} | {dec_wall:.3f} | "
                     f"{dec_gpu:.3f} | {steps} | {dec_wall / steps * 1e3:.2f} | {dec_gpu / steps * 1e3:.2f} | "
                     f"{(all_n - pre_n) / steps:.0f} |")
        top = sorted(dec.items(), key=lambda kv: -kv[1])[:25]
        tables += ["", f"## {scheme}: the decode steps' kernels (GPU ms a step)", "", "| kernel | ms a step |",
                   "| --- | ---: |"] + [f"| `{k[:90]}` | {v / steps / 1e3:.3f} |" for k, v in top]
        ptop = sorted(pre_k.items(), key=lambda kv: -kv[1])[:15]
        tables += ["", f"## {scheme}: the prefill's kernels (GPU ms in all)", "", "| kernel | ms |", "| --- | ---: |"] + \
            [f"| `{k[:90]}` | {v / 1e3:.2f} |" for k, v in ptop]
        data[scheme] = dict(prefill_wall=pre_wall, all_wall=all_wall, prefill_kernels=dict(pre_k),
                            all_kernels=dict(all_k), prefill_launches=pre_n, all_launches=all_n)
        print("\n".join(lines[-1:]), flush=True)
        del llm
        torch.cuda.empty_cache()
    path = write_results(args.out, "profile-offline", device, lines + tables, data)
    print("\n".join(tables))
    print("wrote", path)


if __name__ == "__main__":
    main()
