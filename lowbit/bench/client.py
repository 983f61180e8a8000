"""One streamed request to an OpenAI-compatible server (lowbit serve, vLLM, SGLang, trtllm-serve), timed per chunk.

A chunk that carries text (completions' `text`, chat's `delta.content` or `delta.reasoning_content`) is a token
arrival: the first sets TTFT, the gaps between the rest are the inter-token latencies. Token counts come from the
server's `usage` (asked for with `stream_options.include_usage`); a server that sends none is counted by chunks.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx

from lowbit.bench.datasets import BenchRequest
from lowbit.bench.metrics import tpot

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestRecord:
    index: int
    input_len: int  # as the dataset built it
    output_len: int  # max_tokens asked for
    success: bool = False
    error: str | None = None
    start_s: float = 0.0  # when it was sent, from the start of the benchmark
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_times_s: list[float] = field(default_factory=list)  # text chunk arrivals, from the start of the benchmark
    prompt_tokens: int | None = None  # the server's usage
    completion_tokens: int | None = None
    usage_from_server: bool = False

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2e_s, self.ttft_s, self.completion_tokens)

    def to_dict(self) -> dict:
        return {**asdict(self), "tpot_s": self.tpot_s}


def base_url_root(base_url: str) -> str:
    """`http://host:port` from `http://host:port`, `.../` or `.../v1`."""
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class OpenAIClient:
    def __init__(self, base_url: str, model: str, endpoint: str = "completions", ignore_eos: bool = False,
                 api_key: str | None = None, temperature: float = 0.0):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        self.url = base_url_root(base_url) + ENDPOINTS[endpoint]
        self.model, self.endpoint, self.ignore_eos, self.temperature = model, endpoint, ignore_eos, temperature
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def payload(self, req: BenchRequest) -> dict:
        body: dict = {"model": self.model, "max_tokens": req.output_len, "temperature": self.temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension, which lowbit, SGLang and trtllm-serve accept too
        return body

    def _text(self, choice: dict) -> str:
        if self.endpoint == "chat":
            delta = choice.get("delta") or {}
            return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        return choice.get("text") or ""

    async def send(self, http: httpx.AsyncClient, req: BenchRequest, index: int, t0: float) -> RequestRecord:
        """Send one request and time it; never raises: a failure is a record with success False and the error."""
        rec = RequestRecord(index, req.input_len, req.output_len)
        start = time.perf_counter()
        rec.start_s = start - t0
        last, done = None, False
        try:
            async with http.stream("POST", self.url, json=self.payload(req), headers=self.headers) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    raise _Failed(f"HTTP {resp.status_code}: {_error_message(body)}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise _Failed(f"error in stream: {_error_message(json.dumps(chunk))}")
                    if any(self._text(c) for c in chunk.get("choices") or []):
                        if last is None:
                            rec.ttft_s = now - start
                        else:
                            rec.itl_s.append(now - last)
                        rec.chunk_times_s.append(now - t0)
                        last = now
                    if chunk.get("usage"):
                        rec.prompt_tokens = chunk["usage"].get("prompt_tokens")
                        rec.completion_tokens = chunk["usage"].get("completion_tokens")
                        rec.usage_from_server = True
            rec.e2e_s = time.perf_counter() - start
            if not done:
                raise _Failed("the stream ended before [DONE]")
            if not rec.usage_from_server:
                rec.completion_tokens = len(rec.chunk_times_s)
            if rec.ttft_s is None:
                raise _Failed("the stream ended without any text")
            rec.success = True
        except _Failed as e:
            rec.error = str(e)
        except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
            rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return rec


class _Failed(Exception):
    pass


def _error_message(body: str) -> str:
    try:
        d = json.loads(body)
        err = d.get("error", d)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (json.JSONDecodeError, AttributeError):
        return body.strip()[:300]


async def list_models(http: httpx.AsyncClient, base_url: str, api_key: str | None = None) -> list[str]:
    """The model ids the server serves (GET /v1/models); raises ValueError when it cannot be reached."""
    url = base_url_root(base_url) + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await http.get(url, headers=headers)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {url}: {type(e).__name__} {e}".rstrip()) from None
    if resp.status_code != 200:
        raise ValueError(f"{url}: HTTP {resp.status_code}: {_error_message(resp.text)}")
    return [m.get("id") for m in resp.json().get("data", [])]
