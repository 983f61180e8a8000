"""What a benchmark leaves behind: a text summary, a JSON file with every request, and a PNG of the latency
distributions and the output throughput over time."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from lowbit.bench.metrics import throughput_timeline, tpot


def format_summary(summary: dict, title: str) -> str:
    s = summary
    rows = [("Successful requests", f"{s['completed']}"), ("Failed requests", f"{s['failed']}"),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", f"{s['total_input_tokens']}"),
            ("Total generated tokens", f"{s['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    if "goodput" in s:
        rows.append(("Goodput (req/s)", f"{s['goodput']:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    out = [f"{' ' + title + ' ':=^64}"] + [f"{k + ':':<{width}}{v:>12}" for k, v in rows]
    if "goodput" in s:
        slo = " and ".join(f"{k.upper()} <= {s[f'slo_{k}_ms']:g} ms" for k in ("ttft", "tpot")
                           if s.get(f"slo_{k}_ms") is not None)
        out.append(f"  ({s['good_requests']} of {s['completed']} requests met {slo})")
    out.append(f"{'(ms)':<10}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        st = s[f"{name}_ms"]
        vals = "".join(f"{'-' if st[k] is None else f'{st[k]:.2f}':>10}" for k in ("mean", "median", "p90", "p99",
                                                                                    "max"))
        out.append(f"{name.upper():<10}{vals}")
    for err, n in s["errors"].items():
        out.append(f"failed x{n}: {err}")
    if not s["usage_from_server"] and s["completed"]:
        out.append("note: the server sent no usage; output tokens were counted by stream chunks")
    out.append("=" * 64)
    return "\n".join(out)


def write_json(path: str, config: dict, summary: dict, records: Sequence) -> None:
    """The whole benchmark as one JSON object, written atomically: {"config", "summary", "requests"}."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"config": config, "summary": summary, "requests": [r.to_dict() for r in records]}, f, indent=1)
    os.replace(tmp, path)


def plot(path: str, records: Sequence, summary: dict, title: str) -> None:
    """A 2x2 PNG: TTFT, TPOT and inter-token latency histograms, and output tokens per second over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    series = [("TTFT (ms)", [r.ttft_s * 1e3 for r in ok]),
              ("TPOT (ms)", [t * 1e3 for t in (tpot(r.e2e_s, r.ttft_s, r.completion_tokens) for r in ok)
                             if t is not None]),
              ("inter-token latency (ms)", [x * 1e3 for r in ok for x in r.itl_s])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (label, values) in zip(axes.flat, series):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            st = summary[{"TTFT (ms)": "ttft_ms", "TPOT (ms)": "tpot_ms"}.get(label, "itl_ms")]
            for key, style in (("median", "-"), ("p99", "--")):
                ax.axvline(st[key], color="tab:red", linestyle=style, label=f"{key} {st[key]:.1f}")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("count")
    ax = axes.flat[3]
    t, tok_s = throughput_timeline(records, summary["duration_s"])
    ax.step(t, tok_s, where="post", color="tab:green")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    fails = [r.start_s for r in records if not r.success]
    if fails:
        ax.plot(fails, [0] * len(fails), "x", color="tab:red", label=f"{len(fails)} failed (sent at)")
        ax.legend()
    fig.suptitle(f"{title}: {summary['completed']} ok, {summary['failed']} failed, "
                 f"{summary['output_throughput']:.1f} output tok/s")
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
