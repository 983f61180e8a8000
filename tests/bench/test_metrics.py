"""Benchmark arithmetic against hand-computed answers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lowbit.bench.metrics import meets_slo, stats, summarize, throughput_timeline, tpot
from lowbit.bench.report import format_summary


def rec(ttft, e2e, out, prompt=10, itl=(), chunks=(), success=True, error=None):
    return SimpleNamespace(success=success, ttft_s=ttft, e2e_s=e2e, completion_tokens=out, prompt_tokens=prompt,
                           itl_s=list(itl), chunk_times_s=list(chunks), error=error, usage_from_server=True)


def test_tpot_excludes_the_first_token():
    assert tpot(1.0, 0.2, 5) == pytest.approx(0.2)  # (1.0 - 0.2) / (5 - 1)
    assert tpot(1.0, 0.2, 2) == pytest.approx(0.8)
    assert tpot(1.0, 0.2, 1) is None and tpot(None, 0.2, 5) is None and tpot(1.0, None, 5) is None


def test_stats_known_answers():
    s = stats(list(range(1, 101)))  # 1..100
    assert s["mean"] == 50.5 and s["median"] == 50.5 and s["min"] == 1 and s["max"] == 100
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)  # linear interpolation
    s = stats([0.010, 0.020, 0.030, 0.040], scale=1e3)
    assert s["mean"] == pytest.approx(25.0) and s["median"] == pytest.approx(25.0)
    assert s["p90"] == pytest.approx(37.0) and s["count"] == 4
    assert stats([])["mean"] is None and stats([])["count"] == 0
    assert stats([7.0])["p99"] == 7.0


def test_slo():
    assert meets_slo(0.1, 0.02, 200, 30)
    assert not meets_slo(0.3, 0.02, 200, 30)
    assert not meets_slo(0.1, 0.04, 200, 30)
    assert meets_slo(0.1, None, 200, 30)  # one output token: no TPOT to miss
    assert meets_slo(5.0, 5.0, None, None)


def test_summary_throughput_goodput_and_failures():
    records = [rec(0.1, 1.1, 11, itl=[0.1] * 10),       # tpot 0.1
               rec(0.3, 0.8, 6, itl=[0.1] * 5),         # ttft misses a 200 ms SLO
               rec(0.1, 2.1, 11, itl=[0.2] * 10),       # tpot 0.2 misses a 150 ms SLO
               rec(None, None, None, prompt=None, success=False, error="ConnectError"),
               rec(None, None, None, prompt=None, success=False, error="ConnectError")]
    s = summarize(records, duration_s=4.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert (s["num_requests"], s["completed"], s["failed"]) == (5, 3, 2)
    assert s["errors"] == {"ConnectError": 2}
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 28
    assert s["request_throughput"] == pytest.approx(0.75) and s["output_throughput"] == pytest.approx(7.0)
    assert s["total_token_throughput"] == pytest.approx(14.5)
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(0.25)
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 100 + 200) / 3)
    assert s["ttft_ms"]["median"] == pytest.approx(100)
    assert s["itl_ms"]["count"] == 25 and s["e2e_ms"]["max"] == pytest.approx(2100)
    assert "goodput" not in summarize(records, 4.0)
    text = format_summary(s, "t")
    assert "Failed requests:" in text and "failed x2: ConnectError" in text and "1 of 3 requests met" in text


def test_throughput_timeline_adds_up_to_the_tokens():
    # two requests: 4 chunks carrying 8 tokens (2 per chunk) and 2 chunks of one token; a failed one is left out
    records = [rec(0.1, 1.0, 8, chunks=[0.1, 0.4, 0.7, 1.0]), rec(0.5, 0.6, 2, chunks=[0.5, 0.6]),
               rec(None, None, None, chunks=[0.2], success=False)]
    t, tok_s = throughput_timeline(records, duration_s=1.0, bin_s=0.5)
    assert np.allclose(t, [0.0, 0.5])
    # bin [0, 0.5): chunks 0.1, 0.4 of the first (2 tokens each) -> 4 tokens; bin [0.5, 1]: 0.7, 1.0 (4) + 0.5, 0.6 (2)
    assert np.allclose(tok_s, [4 / 0.5, 6 / 0.5])
    assert tok_s.sum() * 0.5 == pytest.approx(10)
