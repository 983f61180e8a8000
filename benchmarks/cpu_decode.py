"""Decode tokens/s of the default model on the CPU, lowbit against Hugging Face `generate`, same run, same weights.

Decode rate = batch * (N - 1) / (time to generate N tokens - time to generate 1 token), so prefill is excluded for
both. Writes benchmarks/results/cpu-decode-<date>.md.

    python benchmarks/cpu_decode.py [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def lowbit_rate(llm, batch: int, n: int, repeats: int) -> float:
    from lowbit import SamplingParams
    prompts = [PROMPT] * batch

    def gen(k):
        return lambda: llm.generate(prompts, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
    gen(n)()  # warm-up
    return batch * (n - 1) / (best_of(gen(n), repeats) - best_of(gen(1), repeats))


def hf_rate(model, tok, batch: int, n: int, repeats: int) -> float:
    ids = torch.tensor([tok.encode(PROMPT)] * batch)

    def gen(k):
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                      do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        gen(n)()
        return batch * (n - 1) / (best_of(gen(n), repeats) - best_of(gen(1), repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from lowbit import LLM
    from lowbit.default_model import default_model_path
    path = default_model_path()
    llm = LLM(device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    rows = []
    for b in args.batches:
        ours = lowbit_rate(llm, b, args.tokens, args.repeats)
        ref = hf_rate(hf, llm.tokenizer, b, args.tokens, args.repeats)
        rows.append((b, ours, ref))
        print(f"batch {b}: lowbit {ours:.1f} tok/s, Hugging Face {ref:.1f} tok/s, ratio {ours / ref:.2f}x", flush=True)
    date = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    targets = {1: 1.5, 8: 2.0}
    lines = [f"# CPU decode, default model (SmolLM2-135M-Instruct, fp32), {date}", "",
             f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"{args.tokens} greedy tokens after a {len(llm.tokenizer.encode(PROMPT))}-token prompt; best of "
             f"{args.repeats}; prefill excluded (rate from the difference of N-token and 1-token runs).", "",
             "| batch | lowbit tok/s | Hugging Face generate tok/s | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for b, ours, ref in rows:
        t = targets.get(b)
        verdict = "" if t is None else (f">= {t}x: met" if ours / ref >= t else f">= {t}x: MISSED")
        lines.append(f"| {b} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x | {verdict} |")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"cpu-decode-{date}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
