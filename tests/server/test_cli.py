"""`lowbit serve` as a process: its options, and a graceful SIGTERM (refuse new requests, finish the ones in flight,
exit 0)."""
import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from lowbit.cli import build_parser

from .conftest import ServerProcess


def test_serve_defaults_bind_loopback_port_8000_and_the_default_model():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.api_key, args.reasoning_parser) == (
        "127.0.0.1", 8000, None, None, None)
    args = build_parser().parse_args(["serve", "--reasoning-parser", "deepseek-r1", "--served-model-name", "r1"])
    assert args.reasoning_parser == "deepseek-r1" and args.served_model_name == "r1"


def test_an_unknown_reasoning_parser_is_refused():
    r = subprocess.run([sys.executable, "-m", "lowbit", "serve", "--reasoning-parser", "nope"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_sigterm_finishes_the_stream_in_flight_refuses_new_requests_and_exits_0(tmp_path):
    server = ServerProcess([], str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        events, started = [], threading.Event()

        def stream():
            body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
                    "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        except httpx.HTTPError:
            pass  # refused: the listening socket is closed
        else:  # a connection that was already open is answered 503
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        reader.join(120)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 40  # every token of the stream in flight arrived
    assert "Application shutdown complete" in server.log
