"""End to end on one GPU: a DeepSeek-V2-Lite-geometry model (random weights) in bf16 and every scheme, decode tokens/s
at batch 1, 8 and 32, offline throughput for 256 requests of 512 tokens in and 256 out, weight memory, against
Hugging Face transformers `generate` on the same bf16 weights and against the HBM roofline at batch 1 (bytes of
weights one token reads / the copy bandwidth measured in the same run).

Each scheme is its own step, so a lease's 10-minute calls can split the work; results accumulate in
<work>/e2e.json and --report writes benchmarks/results/e2e-<device>-<date>.md from them. A checkpoint is deleted
after the last step of the call that reads it (--keep-checkpoints keeps them: the next call then skips writing it):

    python benchmarks/e2e.py --work /tmp/e2e --steps ceilings,hf,bf16,w4a16      # build checkpoints, measure
    python benchmarks/e2e.py --work /tmp/e2e --steps w4a8,w8a8,w8a16,w4a8-int8,fp8-block,serve
    python benchmarks/e2e.py --work /tmp/e2e --report

lowbit's decode rate = B * (N - 1) over the time of the decode steps alone: the engine is stepped through the prefill,
then timed until every request has its N tokens (the best of three). Hugging Face's = B * (N - 1) / (t(N tokens) -
t(1 token)), its prefill's spread small against its decode.
`serve` starts `lowbit serve` on the w4a8 checkpoint and runs `lowbit bench` against it with 64 concurrent streams.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_random_checkpoint as mrc  # noqa: E402
from results_file import write_results  # noqa: E402

SCHEMES = ["bf16", "w4a16", "w4a8", "w4a8-int8", "w8a16", "w8a8", "w8a8-g32", "fp8-block"]
# batch-1 decode over lowbit's own bf16 (w8a8-g32: w8a8 --act-group-size 32, make_random_checkpoint.VARIANTS)
TARGETS = {"w4a16": 2.0, "w4a8": 2.0, "w8a16": 1.5, "w8a8": 1.5, "w8a8-g32": 1.5}
PROMPT_LEN, DECODE_TOKENS = 32, 128
OFFLINE = (256, 512, 256)  # requests, tokens in, tokens out


def checkpoint_needs(step: str) -> set[str]:
    """The checkpoints (by scheme) a step reads."""
    if step == "hf":
        return {"bf16"}
    if step == "serve":
        return {"w4a8"}
    return {step} if step in SCHEMES else set()


def checkpoints_done(steps: list[str], i: int) -> set[str]:
    """The checkpoints step i reads that no later step of this invocation reads: deleted after step i unless
    --keep-checkpoints (V2-Lite's take 9-32 GB each; a 64 GB disk held three of them, not four: 2026-11-25)."""
    later = set().union(*(checkpoint_needs(s) for s in steps[i + 1:]))
    return checkpoint_needs(steps[i]) - later


def load_results(work: str) -> dict:
    path = os.path.join(work, "e2e.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save_results(work: str, results: dict) -> None:
    tmp = os.path.join(work, "e2e.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(work, "e2e.json"))


def checkpoint(work: str, geometry: str, scheme: str) -> str:
    path = os.path.join(work, f"{geometry}-{scheme}")
    if not os.path.exists(os.path.join(path, "config.json")):
        t = time.perf_counter()
        mrc.write(dict(mrc.GEOMETRIES[geometry]), path, scheme, device=DEVICE, progress=False)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def best(fn, repeats: int = 2) -> float:
    return min(timed(fn) for _ in range(repeats))


def decode_rate(llm, prompts: list[list[int]], n: int) -> float:
    """Output tokens per second of the decode steps alone: every prompt added, the engine stepped until each has its
    first token (the prefill), then timed from there until all have n. A generation of n tokens less one of a single
    token (the former measure) carried the prefill's spread into the rate: the prefill is host-bound (about 50-85 ms
    for 32 tokens on V2-Lite, H100, 2026-11-25), and over 127 steps its spread moved batch-1 rates by 10%."""
    from lowbit import SamplingParams
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    ids = {engine.add_request(p, params) for p in prompts}
    started: set[str] = set()
    while started != ids:
        started |= {o.request_id for o in engine.step()}
    sync()
    t = time.perf_counter()
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    sync()
    assert produced == len(prompts) * (n - 1), f"{produced} decode tokens, not {len(prompts)} x {n - 1}"
    return produced / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------- roofline
def active_weight_bytes(cfg: dict, scheme_name: str) -> int:
    """Bytes of weights one decode token reads: attention, dense and shared MLPs, top-k routed experts, router, the
    head (bf16); the embedding row is negligible."""
    from lowbit.quant.schemes import get_scheme
    recipe = mrc.recipe_for(cfg, scheme_name)
    bf16 = get_scheme("bf16")
    total = 0
    per_layer_experts = cfg["num_experts_per_tok"] / cfg["n_routed_experts"]
    for name, shape in mrc.tensor_shapes(cfg).items():
        if name == "model.embed_tokens.weight":
            continue
        if len(shape) == 1:
            total += shape[0] * 2
            continue
        module = name[:-len(".weight")]
        scheme = (recipe.scheme_for(module) if recipe else None) or bf16
        nbytes = scheme.weight_bytes(*shape) if scheme.format != "dense" else shape[0] * shape[1] * 2
        total += nbytes * (per_layer_experts if ".experts." in name else 1)
    return int(total)


def ceilings() -> dict:
    a = torch.empty(1 << 30 if DEVICE == "cuda" else 1 << 24, dtype=torch.bfloat16, device=DEVICE).normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    t = min(timed(lambda a=a, b=b: b.copy_(a)) for _ in range(10))
    n = a.numel()
    del a, b
    gpu = DEVICE == "cuda"
    if gpu:
        torch.cuda.empty_cache()
    return {"copy_GBps": 2 * n * 2 / t / 1e9, "device": torch.cuda.get_device_name(0) if gpu else "CPU"}


# ---------------------------------------------------------------------------------------------- lowbit
def run_lowbit(path: str, cfg: dict) -> dict:
    from lowbit import LLM, SamplingParams
    gpu = DEVICE == "cuda"
    memory = torch.cuda.memory_allocated if gpu else (lambda: 0)
    before = memory()
    t = time.perf_counter()
    llm = LLM(path, device=DEVICE, dtype="bfloat16", max_num_seqs=256, max_model_len=1024,
              max_num_batched_tokens=16384, kv_cache_memory_gb=12 if gpu else 0.05)
    load_s = time.perf_counter() - t
    runner = llm.engine.runner
    kv_bytes = (runner.num_blocks + 1) * runner.kv_bytes_per_block()
    weights = memory() - before - kv_bytes if gpu else sum(
        p.numel() * p.element_size() for p in runner.model.parameters())
    out = {"load_s": load_s, "weight_GB": weights / 1e9, "cuda_graphs": runner.graphs is not None}
    vocab = cfg["vocab_size"]
    for batch in (1, 8, 32):
        ps = prompts(batch, PROMPT_LEN, vocab, batch)

        llm.generate(ps, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
        rate = max(decode_rate(llm, ps, DECODE_TOKENS) for _ in range(3))
        out[f"decode_b{batch}"] = rate
        print(f"  decode batch {batch}: {rate:.1f} tok/s", flush=True)
    n, n_in, n_out = OFFLINE
    ps = prompts(n, n_in, vocab, 7)
    t = timed(lambda llm=llm: llm.generate(ps, SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)))
    out["offline_s"] = t
    out["offline_out_tok_s"] = n * n_out / t
    out["offline_total_tok_s"] = n * (n_in + n_out) / t
    print(f"  offline {n} x ({n_in} in, {n_out} out): {t:.1f} s, {n * n_out / t:.0f} output tok/s", flush=True)
    del llm, runner
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- Hugging Face
def run_hf(path: str, cfg: dict) -> dict:
    from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=DEVICE).eval()
    out = {"load_s": time.perf_counter() - t}
    vocab = cfg["vocab_size"]

    def gen(batch, length, n, model=model):
        ids = torch.tensor(prompts(batch, length, vocab, batch), device=DEVICE)
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        gen(1, PROMPT_LEN, 4)()
        for batch, n in ((1, 33), (16, 33)):
            rate = batch * (n - 1) / (best(gen(batch, PROMPT_LEN, n)) - best(gen(batch, PROMPT_LEN, 1)))
            out[f"decode_b{batch}"] = rate
            print(f"  HF decode batch {batch}: {rate:.1f} tok/s", flush=True)
        # offline: one batch of 16 requests (all of them would run as such batches at this rate)
        _, n_in, n_out = OFFLINE
        t = timed(gen(16, n_in, n_out))
        out["offline_out_tok_s"] = 16 * n_out / t
        out["offline_batch16_s"] = t
        print(f"  HF offline batch 16 x (512 in, 256 out): {t:.1f} s, {16 * 256 / t:.0f} output tok/s", flush=True)
    del model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- serving
def run_serve(path: str, work: str) -> dict:
    port = 8765
    log = open(os.path.join(work, "serve.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "--model", path, "--device", "cuda",
                               "--port", str(port), "--max-num-seqs", "64", "--max-model-len", "2048",
                               "--kv-cache-memory-gb", "8"], stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"lowbit serve exited {server.returncode}: see {work}/serve.log")
            time.sleep(1)
        result = os.path.join(work, "bench.json")
        bench = subprocess.run([sys.executable, "-m", "lowbit", "bench", "--base-url", f"http://127.0.0.1:{port}",
                                "--input-len", "512", "--output-len", "256", "--num-prompts", "256",
                                "--concurrency", "64", "--ignore-eos", "--result-json", result, "--no-progress",
                                "--tokenizer", path],
                               capture_output=True, text=True, timeout=480)
        print(bench.stdout[-3000:], bench.stderr[-2000:], flush=True)
        with open(result) as f:
            # the summary and config; bench's per-request records (every inter-token latency) stay in bench.json
            return {"bench": {k: v for k, v in json.load(f).items() if k != "requests"},
                    "returncode": bench.returncode}
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


# ---------------------------------------------------------------------------------------------- report
def report(results: dict, out_dir: str, geometry: str) -> str:
    ceil = results.get("ceilings", {})
    device = ceil.get("device", "unknown GPU")
    date = datetime.date.today().isoformat()
    cfg = dict(mrc.GEOMETRIES[geometry])
    copy = ceil.get("copy_GBps")
    L = [f"# lowbit end to end: {geometry} geometry (random weights) on {device}, {date}", "",
         f"Produced by `python benchmarks/e2e.py` (steps accumulated in one lease). Copy bandwidth measured in the "
         f"run: {copy:.0f} GB/s." if copy else "Copy bandwidth: not measured.",
         "lowbit's decode rates time the decode steps alone, the prefill stepped through first (best of three).", "",
         "| scheme | weights (GB) | batch-1 roofline (tok/s) | decode b1 | of roofline | b1 vs bf16 | decode b8 | "
         "decode b32 | offline out tok/s | vs HF offline |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    hf = results.get("hf", {})
    bf16_b1 = results.get("bf16", {}).get("decode_b1")
    for s in SCHEMES:
        r = results.get(s)
        if not r:
            continue
        roof = copy * 1e9 / active_weight_bytes(cfg, s) if copy else float("nan")
        vs_bf16 = r["decode_b1"] / bf16_b1 if bf16_b1 else float("nan")
        vs_hf = r["offline_out_tok_s"] / hf["offline_out_tok_s"] if hf.get("offline_out_tok_s") else float("nan")
        L.append(f"| {s} | {r['weight_GB']:.1f} | {roof:.0f} | {r['decode_b1']:.1f} | {r['decode_b1'] / roof:.0%} | "
                 f"{vs_bf16:.2f}x | {r['decode_b8']:.0f} | {r['decode_b32']:.0f} | {r['offline_out_tok_s']:.0f} | "
                 f"{vs_hf:.1f}x |")
    if hf:
        L += ["", f"Hugging Face transformers `generate`, same bf16 weights: decode {hf['decode_b1']:.1f} tok/s at "
              f"batch 1, {hf['decode_b16']:.0f} at batch 16; offline {hf['offline_out_tok_s']:.0f} output tok/s "
              f"(batch 16, {OFFLINE[1]} in / {OFFLINE[2]} out)."]
    L += ["", "## Targets", ""]
    if bf16_b1 and copy:
        frac = bf16_b1 / (copy * 1e9 / active_weight_bytes(cfg, "bf16"))
        L.append(f"- bf16 batch-1 decode >= 55% of the roofline: {frac:.0%} "
                 f"({'met' if frac >= 0.55 else 'MISSED'})")
    for s, bound in TARGETS.items():
        if s in results and bf16_b1:
            x = results[s]["decode_b1"] / bf16_b1
            L.append(f"- {s} batch-1 decode >= {bound}x bf16: {x:.2f}x ({'met' if x >= bound else 'MISSED'})")
    if "bf16" in results and hf.get("offline_out_tok_s"):
        x = results["bf16"]["offline_out_tok_s"] / hf["offline_out_tok_s"]
        L.append(f"- offline throughput >= 15x Hugging Face (bf16): {x:.1f}x ({'met' if x >= 15 else 'MISSED'})")
    if "serve" in results:
        b = results["serve"]["bench"]
        sm = b.get("summary", {})
        L += ["", "## lowbit serve (w4a8) under lowbit bench, 64 concurrent streams, 512 in / 256 out", ""]
        if sm:
            L += [f"{sm['completed']} of {sm['num_requests']} requests completed, {sm['failed']} failed, in "
                  f"{sm['duration_s']:.1f} s: {sm['output_throughput']:.0f} output tok/s, "
                  f"{sm['total_token_throughput']:.0f} tok/s in and out.", "",
                  "| ms | mean | median | p90 | p99 |", "| --- | --- | --- | --- | --- |"]
            for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
                m = sm.get(key) or {}
                if m.get("count"):
                    L.append(f"| {name} | {m['mean']:.1f} | {m['median']:.1f} | {m['p90']:.1f} | {m['p99']:.1f} |")
        else:
            L += ["```", json.dumps({k: v for k, v in b.items() if not isinstance(v, list)}, indent=1)[:3000], "```"]
    return write_results(out_dir, "e2e", device, L, results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder for checkpoints and accumulated results")
    ap.add_argument("--geometry", default="v2-lite", choices=sorted(mrc.GEOMETRIES))
    ap.add_argument("--steps", default="", help="comma-separated: ceilings, hf, serve and scheme names")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--merge", nargs="*", default=[], help="results files of other calls to merge in first")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script on a tiny geometry")
    ap.add_argument("--offline", type=int, nargs=3, default=[256, 512, 256], metavar=("REQUESTS", "IN", "OUT"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each checkpoint under --work after the last step of this call that reads it")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    global DEVICE, OFFLINE
    DEVICE, OFFLINE = args.device, tuple(args.offline)
    results = load_results(args.work)
    for path in args.merge:
        with open(path) as f:
            results.update(json.load(f))
    cfg = dict(mrc.GEOMETRIES[args.geometry])
    steps = list(filter(None, args.steps.split(",")))
    for i, step in enumerate(steps):
        print(f"== {step}", flush=True)
        if step == "ceilings":
            results["ceilings"] = ceilings()
        elif step == "hf":
            results["hf"] = run_hf(checkpoint(args.work, args.geometry, "bf16"), cfg)
        elif step == "serve":
            results["serve"] = run_serve(checkpoint(args.work, args.geometry, "w4a8"), args.work)
        elif step in SCHEMES:
            results[step] = run_lowbit(checkpoint(args.work, args.geometry, step), cfg)
        else:
            raise SystemExit(f"unknown step {step!r}")
        save_results(args.work, results)
        if not args.keep_checkpoints:
            for scheme in checkpoints_done(steps, i):
                shutil.rmtree(os.path.join(args.work, f"{args.geometry}-{scheme}"), ignore_errors=True)
    if args.report:
        os.makedirs(args.out, exist_ok=True)
        path = report(results, args.out, args.geometry)
        with open(path) as f:
            print(f.read())


if __name__ == "__main__":
    main()
