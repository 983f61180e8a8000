"""The real server as a subprocess (`python -m lowbit serve`) on a free port, and helpers to read its /metrics."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

STARTUP_TIMEOUT_S = 240  # the model loads in ~10-30 s; a busy CI box is slower


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")  # see _one_torch_thread
        self.proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not come up in {STARTUP_TIMEOUT_S} s:\n{self.log}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """Every sample on /metrics as {'name{labels}': value}, plus {'name': value} for unlabelled lookups
        (the first sample of that name)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
            out.setdefault(re.sub(r"\{.*\}", "", key), float(value))
        return out


@contextlib.contextmanager
def serve(tmp_dir, *args: str):
    server = ServerProcess(list(args), os.path.join(str(tmp_dir), "server.log"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The server and the offline reference run side by side on a small, shared CPU: with one torch thread each
    they do not fight over cores (two threads each ran ~10x slower there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default server (`lowbit serve`, no options), shared by the test modules that need no options."""
    with serve(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def model_name(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
