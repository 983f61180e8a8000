"""The quantization accuracy table for the embedded default model (SmolLM2-135M-Instruct): every lowbit scheme x
algorithm beside llama.cpp's Q8_0 and Q4_0 of the same weights, all measured by one `lowbit eval` call against the
same reference (the default GGUF's weights dequantized to float32) over the same held-out tokens.

    python benchmarks/quant_table.py [--max-tokens 4096] [--workdir /tmp/lowbit-quant-table] [--only LABEL ...]
                                     [--tag NAME]

Writes benchmarks/results/quant-table-cpu-<date>[-NAME].md and .json: date, machine, token count, the table, and
which of issue 3's targets are met or missed by how much (`--only` picks rows; the llama.cpp baselines are always
measured in the same run). Runs on the CPU; every model is evaluated in float32, so the
numbers measure the schemes' weight (and activation) quantization and nothing else.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from lowbit.eval.gguf_baseline import requantize_gguf

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# label -> (scheme, algorithm, extra `lowbit quantize` arguments); the default model's hidden size (576) is not a
# multiple of 128, so its 4-bit schemes use group 64 (divides every layer)
CONFIGS = {
    "w8a16 RTN": ("w8a16", "rtn", []),
    "w8a16 GPTQ": ("w8a16", "gptq", []),
    "w8a16 g32 RTN": ("w8a16", "rtn", ["--group-size", "32"]),  # Q8_0's layout: 32-weight groups, 8.5 bits
    "w8a16 GPTQ + rotate": ("w8a16", "gptq", ["--rotate"]),
    "w8a8 RTN": ("w8a8", "rtn", []),
    "w8a8 RTN + SmoothQuant 0.5": ("w8a8", "rtn", ["--smoothquant", "0.5"]),
    "w8a8 GPTQ + SmoothQuant 0.5": ("w8a8", "gptq", ["--smoothquant", "0.5"]),
    "w8a8 GPTQ + SmoothQuant auto": ("w8a8", "gptq", ["--smoothquant", "auto"]),
    "w8a8 RTN + rotate": ("w8a8", "rtn", ["--rotate"]),
    "w8a8 GPTQ + rotate": ("w8a8", "gptq", ["--rotate"]),
    "w8a8 GPTQ + rotate + SmoothQuant auto": ("w8a8", "gptq", ["--rotate", "--smoothquant", "auto"]),
    "w8a8 GPTQ + rotate + online-hadamard": ("w8a8", "gptq", ["--rotate", "--online-hadamard", "128"]),
    "w8a8 GPTQ + rotate + online-hadamard 256": ("w8a8", "gptq", ["--rotate", "--online-hadamard", "256"]),
    "w8a8 GPTQ + rotate + online-hadamard + SmoothQuant auto": ("w8a8", "gptq", ["--rotate", "--online-hadamard",
                                                                                "128", "--smoothquant", "auto"]),
    "w8a8 GPTQ + rotate + online-hadamard 256 + SmoothQuant auto": ("w8a8", "gptq", ["--rotate", "--online-hadamard",
                                                                                    "256", "--smoothquant", "auto"]),
    # w8a8 with one int8 activation scale per token and 32 features (--act-group-size 32), not one per token
    "w8a8 act-g32 GPTQ + rotate": ("w8a8", "gptq", ["--act-group-size", "32", "--rotate"]),
    "w8a8 act-g32 GPTQ + rotate + online-hadamard 256": ("w8a8", "gptq", ["--act-group-size", "32", "--rotate",
                                                                         "--online-hadamard", "256"]),
    "w8a8 act-g32 GPTQ + rotate + online-hadamard 256 + SmoothQuant auto": (
        "w8a8", "gptq", ["--act-group-size", "32", "--rotate", "--online-hadamard", "256", "--smoothquant", "auto"]),
    "w4a16 g64 RTN sym": ("w4a16", "rtn", ["--group-size", "64"]),
    "w4a16 g64 RTN asym": ("w4a16", "rtn", ["--group-size", "64", "--asym"]),
    "w4a16 g64 GPTQ sym": ("w4a16", "gptq", ["--group-size", "64"]),
    "w4a16 g64 GPTQ asym": ("w4a16", "gptq", ["--group-size", "64", "--asym"]),
    "w4a8 g64 RTN": ("w4a8", "rtn", ["--group-size", "64"]),
    "w4a8 g64 GPTQ": ("w4a8", "gptq", ["--group-size", "64"]),
    "w4a8-int8 g64 RTN": ("w4a8-int8", "rtn", ["--group-size", "64"]),
    "w4a8-int8 g64 GPTQ": ("w4a8-int8", "gptq", ["--group-size", "64"]),
    "fp8-block RTN": ("fp8-block", "rtn", []),
}
BASELINES = {"llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_0": "Q4_0"}
# the default model's linear layers, [out, in] (q, k, v, o, gate, up, down), for bits per weight
LINEAR_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", *args]


def bits_per_weight(scheme: str, extra: list[str]) -> float | None:
    """Stored bits per weight of the quantized linear layers (values, scales, zero points), from the scheme."""
    from lowbit.quant.schemes import get_scheme
    opts = {"group_size": int(extra[extra.index("--group-size") + 1]) if "--group-size" in extra else None,
            "symmetric": False if "--asym" in extra else None}
    s = get_scheme(scheme, **opts)
    total = sum(s.weight_bytes(o, i) for o, i in LINEAR_SHAPES)
    return 8 * total / sum(o * i for o, i in LINEAR_SHAPES)


def source_state() -> str:
    """The commit the table was made at, and whether lowbit/ had uncommitted changes then."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        paths = ["lowbit/quant", "lowbit/eval", "lowbit/models", "lowbit/layers", "lowbit/engine"]
        dirty = subprocess.run(["git", "-C", root, "status", "--short", *paths], capture_output=True,
                               text=True).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"{head}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores (shared with other jobs), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def make_baselines(workdir: str, log) -> dict[str, dict]:
    from lowbit.default_model import default_model_path
    out = {}
    for label, qtype in BASELINES.items():
        path = os.path.join(workdir, f"smollm2-135m-{qtype}.gguf")
        t0 = time.perf_counter()
        if not os.path.exists(path):
            requantize_gguf(default_model_path(), path, qtype)
        out[label] = {"path": path, "scheme": qtype, "algorithm": "llama.cpp (gguf package)",
                      "bits_per_weight": {"Q8_0": 8.5, "Q4_0": 4.5}[qtype],
                      "make_seconds": round(time.perf_counter() - t0, 1)}
        log(f"{label}: {path} ({out[label]['make_seconds']} s)")
    return out


def _complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(
        os.path.join(path, ".lowbit-incomplete"))


def quantize_all(workdir: str, labels: list[str], log) -> dict[str, dict]:
    """Run `lowbit quantize` for each row (a finished checkpoint in `workdir` is reused with the time it took,
    kept beside it), then check that each loads and runs with a few tokens of `lowbit eval`: a row that fails
    either step is reported with its error line instead of failing the whole table."""
    out = {}
    for label in labels:
        scheme, algo, extra = CONFIGS[label]
        path = os.path.join(workdir, label.replace(" + ", "-").replace(" ", "-").replace(".", ""))
        cmd = lowbit("quantize", "--scheme", scheme, "--algo", algo, *extra, "--output", path, "--quiet")
        entry = {"path": path, "scheme": scheme, "algorithm": algo, "args": extra,
                 "command": " ".join(["lowbit", *cmd[3:-1]])}
        try:
            entry["bits_per_weight"] = round(bits_per_weight(scheme, extra), 3)
        except (ValueError, ImportError) as e:
            entry["bits_per_weight"] = None
            log(f"{label}: bits per weight unknown ({e})")
        timing = path + ".quantize.json"
        if _complete(path) and os.path.exists(timing):
            with open(timing) as f:
                entry["quantize_seconds"] = json.load(f)["seconds"]
            log(f"{label}: reusing {path} (quantized in {entry['quantize_seconds']} s)")
        else:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            entry["quantize_seconds"] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0:
                entry["error"] = "quantize: " + (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                log(f"{label}: {entry['error']}")
                out[label] = entry
                continue
            with open(timing, "w") as f:
                json.dump({"seconds": entry["quantize_seconds"], "command": entry["command"]}, f)
            log(f"{label}: quantized in {entry['quantize_seconds']} s")
        check = subprocess.run(lowbit("eval", "--model", path, "--max-tokens", "8", "--window", "9",
                                      "--dtype", "float32", "--device", "cpu"), capture_output=True, text=True)
        if check.returncode != 0:
            entry["error"] = "eval: " + (check.stderr.strip().splitlines() or ["(no message)"])[-1]
            log(f"{label}: {entry['error']}")
        out[label] = entry
    return out


def check_targets(rows: dict[str, dict]) -> list[dict]:
    """Issue 3's targets, each met or missed by how much (ratio of mean KLDs); those whose rows were not part of
    this run are left out, a row that failed is "not measured"."""
    def kld(label):
        r = rows.get(label)
        return r.get("kld_mean") if r else None

    targets = []

    def at_or_below(label, bound_label, what):
        if label not in rows:
            return
        a, b = kld(label), kld(bound_label)
        if a is None or b is None:
            targets.append({"target": what, "status": "not measured"})
            return
        targets.append({"target": what, "value": a, "bound": b, "ratio": a / b,
                        "status": "met" if a <= b else "missed"})

    for label in (label for label in CONFIGS if label.startswith(("w8a16 ", "w8a8 "))):
        at_or_below(label, "llama.cpp Q8_0", f"{label}: mean KLD <= llama.cpp Q8_0's")
    for label in ("w4a16 g64 GPTQ sym", "w4a16 g64 GPTQ asym"):
        at_or_below(label, "llama.cpp Q4_0", f"{label}: mean KLD <= llama.cpp Q4_0's")
    for kind in ("sym", "asym"):
        if f"w4a16 g64 GPTQ {kind}" not in rows or f"w4a16 g64 RTN {kind}" not in rows:
            continue
        g, r = kld(f"w4a16 g64 GPTQ {kind}"), kld(f"w4a16 g64 RTN {kind}")
        what = f"w4a16 g64 {kind}: GPTQ mean KLD <= 0.7x RTN's"
        if g is None or r is None:
            targets.append({"target": what, "status": "not measured"})
        else:
            targets.append({"target": what, "value": g, "bound": 0.7 * r, "ratio": g / r,
                            "status": "met" if g <= 0.7 * r else "missed"})
    return targets


def to_markdown(report: dict) -> str:
    ev = report["eval"]
    lines = [
        "# Quantization accuracy: the default model (SmolLM2-135M-Instruct), CPU",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}",
        f"- lowbit source: {report['source']}; {report['total_seconds'] / 60:.0f} min in all",
        f"- text: {ev['text']}; {ev['tokens']} tokens scored, non-overlapping windows of {ev['window']} tokens "
        f"({ev['windows']} window{'s' if ev['windows'] != 1 else ''}; the first token of each is context only)",
        f"- reference: the default GGUF (Q4_1 linear weights, Q8_0 embedding) dequantized to float32, "
        f"perplexity {ev['reference']['perplexity']:.4f}; every model runs in float32 (`--dtype float32`)",
        "- llama.cpp baselines: every 2-D weight but the token embedding requantized from the reference's float32 "
        "to Q8_0 / Q4_0 with the `gguf` package; the (tied) token embedding / output head is kept as the reference "
        "has it, as lowbit's schemes keep `lm_head` unquantized",
        f"- one `lowbit eval` call measured all models: `{report['eval_command']}` ({report['eval_seconds']:.0f} s)",
        "- KLD: KL(reference || model) in nats per token; top-1: share of positions where both models' most likely "
        "next token is the same",
        "",
        "| model | bits/weight | perplexity | mean KLD | p99 KLD | top-1 | quantize s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in report["rows"].items():
        bits = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else "-"
        qs = r.get("quantize_seconds", r.get("make_seconds", "-"))
        if "error" in r:
            lines.append(f"| {label} | {bits} | failed: {r['error']} | | | | {qs} |")
            continue
        lines.append(f"| {label} | {bits} | {r['perplexity']:.4f} | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {qs} |")
    lines += ["", "## Targets (issue 3)", "", "| target | status | value | bound | ratio |",
              "| --- | --- | ---: | ---: | ---: |"]
    for t in report["targets"]:
        if t["status"] == "not measured":
            lines.append(f"| {t['target']} | not measured | | | |")
        else:
            lines.append(f"| {t['target']} | {t['status']} | {t['value']:.5f} | {t['bound']:.5f} | "
                         f"{t['ratio']:.2f} |")
    lines += ["", "Commands that made each checkpoint:", ""]
    lines += [f"- {label}: `{r['command']}`" for label, r in report["rows"].items() if "command" in r]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/lowbit-quant-table", help="where checkpoints are written")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--only", nargs="*", default=None, metavar="LABEL", help="a subset of the lowbit rows")
    p.add_argument("--tag", default=None, help="suffix of the results files' names (a subset beside the full table)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    os.makedirs(args.workdir, exist_ok=True)
    labels = args.only or list(CONFIGS)
    unknown = [label for label in labels if label not in CONFIGS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {', '.join(CONFIGS)}")
    t_start = time.perf_counter()
    source = source_state()
    rows = {**make_baselines(args.workdir, log), **quantize_all(args.workdir, labels, log)}

    ok = [label for label, r in rows.items() if "error" not in r]
    cmd = lowbit("eval", "--json", "--dtype", "float32", "--device", "cpu", "--reference", "default",
                 "--max-tokens", str(args.max_tokens), "--window", str(args.window),
                 *sum((["--model", rows[label]["path"]] for label in ok), []))
    log(f"eval of {len(ok)} models: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress goes to our stderr
    if proc.returncode != 0:
        log("lowbit eval failed")
        return 1
    ev = json.loads(proc.stdout)
    eval_seconds = time.perf_counter() - t0
    by_path = {r["model"]: r for r in ev["results"]}
    for label in ok:
        rows[label].update({k: v for k, v in by_path[rows[label]["path"]].items() if k != "model"})

    date = datetime.date.today().isoformat()
    report = {"date": date, "machine": machine(), "source": source,
              "eval": {k: v for k, v in ev.items() if k != "results"},
              "eval_command": " ".join(["lowbit", *cmd[3:cmd.index("--model")], "--model CHECKPOINT"])
              + f" (x{len(ok)})",
              "eval_seconds": round(eval_seconds, 1),
              "total_seconds": round(time.perf_counter() - t_start, 1),
              "rows": rows, "targets": check_targets(rows)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"quant-table-cpu-{date}" + (f"-{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(report))
    log(f"wrote {stem}.md and .json ({report['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
