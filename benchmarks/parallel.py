"""Tensor and expert parallel decode against one GPU: tokens/s at batch 1 and 32 for TP=2 and EP=2 on the
DeepSeek-V2-Lite geometry and a full-width DeepSeek-R1 slice (random weights), with the all-reduce cost measured in
the same run to say where the time goes.

The driver starts each configuration as its own torchrun job and collects what rank 0 writes:

    python benchmarks/parallel.py --work /tmp/par [--geometries v2-lite,r1] [--scheme bf16]
    python benchmarks/parallel.py --work /tmp/par --device cpu --geometries tiny     (checks the script, gloo)

Writes benchmarks/results/parallel-<device>-<date>.md. Targets (issue #8): TP=2 batch-1 decode >= 1.5x one GPU on
the R1 slice and >= 1.2x on V2-Lite; EP=2 batch-32 decode >= 1.4x. Each job runs under `timeout`: a process
group's teardown has been seen to hang on the two-H200 machine after the work ended.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from results_file import write_results  # noqa: E402

LAYOUTS = {"1 GPU": (1, 1, False), "TP=2": (2, 2, False), "EP=2": (2, 1, True)}  # name -> (world, tp, ep)
TARGETS = [("r1", "TP=2", 1, 1.5), ("v2-lite", "TP=2", 1, 1.2), ("r1", "EP=2", 32, 1.4), ("v2-lite", "EP=2", 32, 1.4)]


def worker(args) -> None:
    """One layout, under torchrun: decode rates at batch 1 and 32, and the all-reduce time of one decode step's
    hidden state; rank 0 writes them as JSON."""
    import torch.distributed as dist

    from lowbit import LLM, SamplingParams
    from lowbit.engine import parallel
    tp, ep = args.tp, args.ep
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    llm = LLM(args.model, device=device, dtype="bfloat16" if device == "cuda" else "float32",
              tensor_parallel_size=tp, expert_parallel=ep, max_num_seqs=64, max_model_len=1024,
              kv_cache_memory_gb=8 if device == "cuda" else 0.05)
    cfg = llm.engine.model_config
    out = {"world": int(os.environ.get("WORLD_SIZE", 1)), "tp": tp, "ep": ep}
    g = torch.Generator().manual_seed(0)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t
    for batch in (1, 32):
        prompts = torch.randint(10, cfg.vocab_size, (batch, 32), generator=g).tolist()

        def gen(n, prompts=prompts):
            return lambda: llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        gen(4)()
        n = args.tokens
        rate = batch * (n - 1) / (min(timed(gen(n)) for _ in range(2)) - min(timed(gen(1)) for _ in range(2)))
        out[f"decode_b{batch}"] = rate
    if dist.is_initialized() and dist.get_world_size() > 1:
        for batch in (1, 32):
            x = torch.randn(batch, cfg.hidden_size, device=device,
                            dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            parallel.all_reduce(x, expert=ep)  # the collective this layout's layers make
            t = timed(lambda x=x: [parallel.all_reduce(x, expert=ep) for _ in range(50)]) / 50
            out[f"allreduce_b{batch}_us"] = t * 1e6
    # all-reduces per decode step: two per layer under TP (attention, MLP), one per MoE layer under EP alone
    out["allreduces_per_step"] = (cfg.num_hidden_layers - cfg.first_k_dense_replace if ep and tp == 1
                                  else 2 * cfg.num_hidden_layers)
    if parallel.is_first_rank():
        with open(args.result, "w") as f:
            json.dump(out, f)


def run_layout(args, geometry: str, name: str, model: str) -> dict:
    world, tp, ep = LAYOUTS[name]
    tag = name.replace("=", "").replace(" ", "") + ("-oneshot" if os.environ.get("LOWBIT_ONESHOT_ALLREDUCE") else "")
    result = os.path.join(args.work, f"{geometry}-{tag}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           os.path.abspath(__file__), "--worker", "--model", model, "--tp", str(tp), "--result", result,
           "--device", args.device, "--tokens", str(args.tokens)] + (["--ep"] if ep else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    r = subprocess.run(["timeout", str(args.timeout)] + cmd, env=env, capture_output=True, text=True)
    if not os.path.exists(result):
        raise RuntimeError(f"{geometry} {name} wrote no result (exit {r.returncode}):\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")
    with open(result) as f:
        out = json.load(f)
    out["wall_s"] = time.perf_counter() - t
    out["exit"] = r.returncode  # 124: the teardown hung after the result was written
    print(f"{geometry} {name}: {out}", flush=True)
    return out


def report(results: dict, device: str, out_dir: str) -> str:
    date = datetime.date.today().isoformat()
    L = [f"# lowbit tensor / expert parallel decode on {device}, {date}", "",
         "Produced by `python benchmarks/parallel.py`; random weights; bf16 on GPUs. Rates in tokens/s; the "
         "all-reduce column is one all-reduce of a decode step's hidden state (eager), of which a step makes two per "
         "layer under TP and one per MoE layer under EP.", "", "| geometry | layout | decode b1 | vs 1 GPU | decode b32 | vs 1 GPU | all-reduce b1 (us) | "
         "all-reduces per step (ms) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for geometry, layouts in results.items():
        base = layouts.get("1 GPU", {})
        for name, r in layouts.items():
            ar = r.get("allreduce_b1_us")
            per_step = f"{r['allreduces_per_step'] * ar / 1000:.2f}" if ar else "-"
            L.append(f"| {geometry} | {name} | {r['decode_b1']:.1f} | {r['decode_b1'] / base['decode_b1']:.2f}x | "
                     f"{r['decode_b32']:.0f} | {r['decode_b32'] / base['decode_b32']:.2f}x | "
                     f"{f'{ar:.0f}' if ar else '-'} | {per_step} |")
    L += ["", "## Targets", ""]
    for geometry, name, batch, bound in TARGETS:
        for variant in (name, f"{name} one-shot"):
            if geometry in results and variant in results[geometry]:
                x = results[geometry][variant][f"decode_b{batch}"] / results[geometry]["1 GPU"][f"decode_b{batch}"]
                L.append(f"- {variant} batch-{batch} decode on {geometry} >= {bound}x one GPU: {x:.2f}x "
                         f"({'met' if x >= bound else 'MISSED'})")
    return write_results(out_dir, "parallel", device, L, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/lowbit-parallel")
    ap.add_argument("--geometries", default="v2-lite,r1")
    ap.add_argument("--scheme", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=500)
    ap.add_argument("--one-shot", action="store_true",
                    help="also run TP=2 / EP=2 with the one-shot peer-memory all-reduce (LOWBIT_ONESHOT_ALLREDUCE=1)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    # worker mode (under torchrun)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", action="store_true")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import make_random_checkpoint as mrc
    os.makedirs(args.work, exist_ok=True)
    results = {}
    for geometry in args.geometries.split(","):
        model = os.path.join(args.work, f"{geometry}-{args.scheme}")
        if not os.path.exists(os.path.join(model, "config.json")):
            mrc.write(dict(mrc.GEOMETRIES[geometry]), model, args.scheme, device=args.device, progress=False)
        results[geometry] = {name: run_layout(args, geometry, name, model) for name in LAYOUTS}
        if args.one_shot:
            os.environ["LOWBIT_ONESHOT_ALLREDUCE"] = "1"
            for name in ("TP=2", "EP=2"):
                results[geometry][f"{name} one-shot"] = run_layout(args, geometry, name, model)
            del os.environ["LOWBIT_ONESHOT_ALLREDUCE"]
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo)"
    os.makedirs(args.out, exist_ok=True)
    path = report(results, device, args.out)
    with open(path) as f:
        print(f.read())


if __name__ == "__main__":
    main()
