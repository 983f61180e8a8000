"""Benchmark arithmetic, pure functions of per-request timings: TPOT, percentiles, throughput, goodput, and output
tokens per second over time. Records are anything with RequestRecord's attributes (success, ttft_s, e2e_s, itl_s,
prompt_tokens, completion_tokens, chunk_times_s, error)."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


def tpot(e2e_s: float | None, ttft_s: float | None, output_tokens: int | None) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (output_tokens - 1); None for fewer than 2 tokens."""
    if e2e_s is None or ttft_s is None or output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def stats(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean, median, p90, p99 (linear interpolation between order statistics), min and max, times `scale`."""
    keys = ("mean", "median", "p90", "p99", "min", "max")
    if len(values) == 0:
        return {k: None for k in keys} | {"count": 0}
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(a.min()), "max": float(a.max()), "count": int(a.size)}


def meets_slo(ttft_s: float | None, tpot_s: float | None, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> bool:
    """Whether a finished request met every SLO given (a request of one token has no TPOT to miss)."""
    if slo_ttft_ms is not None and (ttft_s is None or ttft_s * 1e3 > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None and tpot_s is not None and tpot_s * 1e3 > slo_tpot_ms:
        return False
    return True


def summarize(records: Sequence, duration_s: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict:
    """The benchmark's summary: counts, token totals, throughputs, goodput and latency statistics in ms."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    tpots = [t for t in (tpot(r.e2e_s, r.ttft_s, r.completion_tokens) for r in ok) if t is not None]
    in_tok = sum(r.prompt_tokens or 0 for r in ok)
    out_tok = sum(r.completion_tokens or 0 for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out = {
        "num_requests": len(records), "completed": len(ok), "failed": len(failed),
        "errors": dict(Counter(r.error for r in failed).most_common()),
        "duration_s": duration_s, "total_input_tokens": in_tok, "total_output_tokens": out_tok,
        "request_throughput": per_s(len(ok)), "output_throughput": per_s(out_tok),
        "total_token_throughput": per_s(in_tok + out_tok),
        "ttft_ms": stats([r.ttft_s for r in ok], 1e3), "tpot_ms": stats(tpots, 1e3),
        "itl_ms": stats([x for r in ok for x in r.itl_s], 1e3), "e2e_ms": stats([r.e2e_s for r in ok], 1e3),
        "usage_from_server": all(r.usage_from_server for r in ok),
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slo(r.ttft_s, tpot(r.e2e_s, r.ttft_s, r.completion_tokens), slo_ttft_ms, slo_tpot_ms)
                   for r in ok)
        out.update(slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, good_requests=good, goodput=per_s(good))
    return out


def throughput_timeline(records: Sequence, duration_s: float, bin_s: float | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(bin start times, output tokens per second in each bin) over the benchmark. Each request's tokens are spread
    over its text chunks (a chunk may carry several tokens), so the bins add up to the tokens of finished requests."""
    if bin_s is None:  # fine enough to show the shape, coarse enough that most bins hold a decode step
        itl = [x for r in records if r.success for x in r.itl_s]
        bin_s = max(duration_s / 50, 2 * float(np.median(itl)) if itl else 0.0, 0.05)
    n_bins = max(1, math.ceil(duration_s / bin_s))
    tokens = np.zeros(n_bins)
    for r in records:
        if not r.success or not r.chunk_times_s:
            continue
        weight = (r.completion_tokens or len(r.chunk_times_s)) / len(r.chunk_times_s)
        idx = np.minimum((np.asarray(r.chunk_times_s) / bin_s).astype(int), n_bins - 1)
        np.add.at(tokens, idx, weight)
    return np.arange(n_bins) * bin_s, tokens / bin_s
