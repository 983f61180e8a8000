"""Decode tokens/s of the default model on the CPU, lowbit against Hugging Face `generate`, same run, same weights.

lowbit runs in bfloat16, which on the CPU uses the GGUF's Q4_1 weights as stored (torch's int4 GEMM, bf16
activations); Hugging Face runs the same weights dequantized, in float32 (the target is stated against it). For
context the same run also measures lowbit in float32 (the dequantized reference path) and Hugging Face in bfloat16.

Decode rate = batch * (N - 1) / (time to generate N tokens - time to generate 1 token), so prefill is excluded for
all. Writes benchmarks/results/cpu-decode-<date>.md.

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


AGREEMENT_TOKENS = 256


def agreement(fast, ref) -> tuple[float, float, float]:
    """Mean KL(ref || fast), top-1 agreement and max |logit difference| over the first tokens of the GPL-3 text."""
    import lowbit
    with open(os.path.join(os.path.dirname(lowbit.__file__), "data", "eval", "gpl-3.txt")) as f:
        ids = ref.tokenizer.encode(f.read(20000))[:AGREEMENT_TOKENS]
    a, b = fast.logits(ids), ref.logits(ids)
    p, q = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return kl, (a.argmax(-1) == b.argmax(-1)).float().mean().item(), (a - b).abs().max().item()


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
    load_before = os.getloadavg()
    fast, ref = LLM(device="cpu", dtype="bfloat16"), LLM(device="cpu", dtype="float32")

    def hf(dtype):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=dtype).eval()
    hf32, hf16 = hf(torch.float32), hf(torch.bfloat16)
    rows = []
    for b in args.batches:
        ours = lowbit_rate(fast, b, args.tokens, args.repeats)
        base = hf_rate(hf32, fast.tokenizer, b, args.tokens, args.repeats)
        ours32 = lowbit_rate(ref, b, args.tokens, args.repeats)
        base16 = hf_rate(hf16, fast.tokenizer, b, args.tokens, args.repeats)
        rows.append((b, ours, base, ours32, base16))
        print(f"batch {b}: lowbit bf16/int4 {ours:.1f} tok/s, Hugging Face fp32 {base:.1f} tok/s, ratio "
              f"{ours / base:.2f}x (lowbit fp32 {ours32:.1f}, Hugging Face bf16 {base16:.1f})", flush=True)
    load_after = os.getloadavg()
    kl, top1, max_diff = agreement(fast, ref)
    date = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    targets = {1: 1.5, 8: 2.0}
    load = (f"{'/'.join(f'{x:.2f}' for x in load_before)} before the run, "
            f"{'/'.join(f'{x:.2f}' for x in load_after)} after")
    machine = (f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
               f"threads; load average (1/5/15 min) {load} (other processes share the cores). {args.tokens} greedy "
               f"tokens after a {len(fast.tokenizer.encode(PROMPT))}-token prompt; best of {args.repeats}; prefill "
               f"excluded (rate from the difference of N-token and 1-token runs).")
    what = ("lowbit: `LLM(dtype=\"bfloat16\")`, which runs the file's Q4_1 weights as stored through torch's CPU int4 "
            "GEMM (`_weight_int4pack_mm_for_cpu`: bf16 activations, scales and zeros rounded to bf16) and the rest "
            "of the model in bf16. Hugging Face: the same GGUF dequantized by transformers, float32 (the baseline "
            "the targets are stated against). The fast path is opt-in: float32, the CPU's `dtype=\"auto\"`, stays the "
            "dequantized reference that the Hugging Face parity tests (max |logit difference| <= 1e-3) check.")
    accuracy = (f"Accuracy of the bf16 + Q4_1 path against lowbit's float32 path (same weights dequantized), next-token "
                f"logits over {AGREEMENT_TOKENS} tokens of the GPL-3 text: mean KL {kl:.1e} nats, top-1 agreement "
                f"{100 * top1:.1f}%, max |logit difference| {max_diff:.2f}.")
    lines = [f"# CPU decode, default model (SmolLM2-135M-Instruct Q4_1 GGUF), {date}", "", machine, "", what, "", accuracy, "",
             "| batch | lowbit bf16 + Q4_1 tok/s | Hugging Face fp32 tok/s | ratio | target |",
             "| --- | --- | --- | --- | --- |"]
    for b, ours, base, _, _ in rows:
        t = targets.get(b)
        verdict = "" if t is None else (f">= {t}x: met" if ours / base >= t else f">= {t}x: MISSED")
        lines.append(f"| {b} | {ours:.1f} | {base:.1f} | {ours / base:.2f}x | {verdict} |")
    context = ("Same run, for context: lowbit float32 (the dequantized reference path: `dtype=\"float32\"`, and "
               "the CPU's `dtype=\"auto\"`) and Hugging Face in bfloat16.")
    lines += ["", context, "",
              "| batch | lowbit fp32 tok/s | Hugging Face bf16 tok/s | lowbit bf16 + Q4_1 / Hugging Face bf16 |",
              "| --- | --- | --- | --- |"]
    for b, ours, _, ours32, base16 in rows:
        lines.append(f"| {b} | {ours32:.1f} | {base16:.1f} | {ours / base16:.2f}x |")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"cpu-decode-{date}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
