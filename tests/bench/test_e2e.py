"""`lowbit bench` against `lowbit serve` on the default model, both as the user runs them."""
from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lowbit.cli import main as lowbit_main

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lowbit serve` on the default model in a subprocess, started on first use and again after a test kills it
    (starting takes tens of seconds on a busy CPU, so the tests share one)."""

    def __init__(self, log_path):
        self.log_path, self.proc, self.url = log_path, None, None

    def ensure(self) -> Server:
        if self.proc is not None and self.proc.poll() is None:
            return self
        port = _free_port()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "--port", str(port)], stdout=log,
                                         stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"lowbit serve exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                pytest.fail(f"lowbit serve not healthy after 300 s: {self.log()}")
            time.sleep(0.5)

    def log(self) -> str:
        return open(self.log_path).read()[-2000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve") / "serve.log")
    yield srv
    srv.stop()


def server_counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(rf"^lowbit:{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_bench_against_serve(server, tmp_path, capsys):
    result, png = tmp_path / "bench.json", tmp_path / "bench.png"
    url = server.ensure().url
    prompt0, gen0 = server_counter(url, "prompt_tokens"), server_counter(url, "generation_tokens")
    rc = lowbit_main(["bench", "--base-url", url, "--num-prompts", "8", "--input-len", "16", "--output-len", "8",
                      "--ignore-eos", "--concurrency", "4", "--result-json", str(result), "--plot", str(png),
                      "--slo-ttft", "60000", "--no-progress"])
    prompt1, gen1 = server_counter(url, "prompt_tokens"), server_counter(url, "generation_tokens")
    assert rc == 0
    out = capsys.readouterr().out
    assert "Successful requests:" in out and "TTFT" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(result.read_text())
    s, reqs = d["summary"], d["requests"]
    assert (s["completed"], s["failed"], len(reqs)) == (8, 0, 8)
    for r in reqs:
        assert r["success"] and r["usage_from_server"]
        assert r["prompt_tokens"] == r["input_len"] == 16  # the random prompt is exactly 16 tokens to the server
        assert r["completion_tokens"] == r["output_len"] == 8  # --ignore-eos
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        chunks = r["chunk_times_s"]
        # the server never splits one token's text over several chunks (success already implies a first chunk)
        assert len(chunks) <= r["completion_tokens"]
        # arrivals are in order, the first at TTFT and the last by the end, each gap an inter-token latency
        assert chunks == sorted(chunks) and len(r["itl_s"]) == len(chunks) - 1
        assert abs(chunks[0] - (r["start_s"] + r["ttft_s"])) < 1e-3 and chunks[-1] <= r["start_s"] + r["e2e_s"]
        assert all(abs((b - a) - g) < 1e-3 for a, b, g in zip(chunks, chunks[1:], r["itl_s"], strict=False))
    # the bench's token totals are the server's own counters
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs) == prompt1 - prompt0
    assert s["total_output_tokens"] == sum(r["completion_tokens"] for r in reqs) == gen1 - gen0
    assert s["good_requests"] == 8 and s["ttft_ms"]["max"] <= s["e2e_ms"]["max"]


def test_server_stopped_mid_run_counts_failures(server, tmp_path, capsys):
    result = tmp_path / "bench.json"
    n = 24
    url = server.ensure().url
    done0 = server_counter(url, "request_success")
    outcome = {}
    bench = threading.Thread(target=lambda: outcome.update(rc=lowbit_main([
        "bench", "--base-url", url, "--num-prompts", str(n), "--input-len", "16", "--output-len", "16",
        "--ignore-eos", "--concurrency", "2", "--result-json", str(result), "--no-progress"])))
    bench.start()
    deadline = time.monotonic() + 240
    while server_counter(url, "request_success") < done0 + 2:  # let a few finish, then kill the server
        assert bench.is_alive(), "the bench ended before the server was stopped"
        assert time.monotonic() < deadline, "no request finished in 240 s"
        time.sleep(0.2)
    server.stop()
    bench.join(timeout=180)
    assert not bench.is_alive()
    assert outcome["rc"] == 0
    out = capsys.readouterr().out
    d = json.loads(result.read_text())
    s, reqs = d["summary"], d["requests"]
    failed = [r for r in reqs if not r["success"]]
    assert len(reqs) == n and s["completed"] + s["failed"] == n
    assert s["completed"] >= 2 and s["failed"] == len(failed) >= 1
    assert all(r["error"] for r in failed) and sum(s["errors"].values()) == s["failed"]
    assert re.search(rf"Failed requests:\s+{s['failed']}\n", out)
