"""`lowbit eval`: what quantization cost, as perplexity, KL divergence and top-1 agreement against a reference."""
from __future__ import annotations

import argparse
import json
import sys

from lowbit.eval.runner import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None, metavar="PATH",
                   help="model folder or .gguf file to measure (default: the embedded SmolLM2-135M); repeat it to "
                        "measure several against one pass of the reference")
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="the unquantized model to compare with (KL divergence, top-1 agreement); "
                        "without it only perplexity is measured")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="held-out UTF-8 text (default: the built-in GNU GPL v3 text)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens to score (default {DEFAULT_MAX_TOKENS}; 0: the whole text)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"tokens per forward pass; windows do not overlap (default {DEFAULT_WINDOW})")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def format_table(report: dict) -> str:
    """The report as a plain-text table, one row per model (the reference first when there is one)."""
    with_ref = report["reference"] is not None
    head = ["model", "perplexity"] + (["KLD mean", "KLD p99", "top-1"] if with_ref else [])
    rows = []
    if with_ref:
        rows.append([f"{report['reference']['model']} (reference)", f"{report['reference']['perplexity']:.4f}",
                     "-", "-", "-"])
    for r in report["results"]:
        row = [r["model"], f"{r['perplexity']:.4f}"]
        if with_ref:
            row += [f"{r['kld_mean']:.5f}", f"{r['kld_p99']:.4f}", f"{100 * r['top1_agreement']:.1f}%"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    n = report["windows"]
    title = (f"{report['tokens']} tokens of {report['text']} in {n} window{'s' if n != 1 else ''} of "
             f"<= {report['window']} tokens" + (", KL(reference || model) in nats per token" if with_ref else ""))
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, rows)])


def run(args) -> int:
    from lowbit.eval.runner import evaluate
    report = evaluate(args.model or [None], reference=args.reference, text_path=args.text,
                      max_tokens=args.max_tokens or None, window=args.window, device=args.device,
                      dtype=args.dtype, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
