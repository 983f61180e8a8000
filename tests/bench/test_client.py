"""The streaming client against scripted SSE answers (httpx's mock transport): what it counts and what it fails."""
from __future__ import annotations

import asyncio
import json

import httpx

from lowbit.bench.client import OpenAIClient, base_url_root
from lowbit.bench.datasets import BenchRequest


def sse(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n" for o in objs)


def send(handler, endpoint="completions", ignore_eos=False):
    client = OpenAIClient("http://server/v1", "m", endpoint, ignore_eos=ignore_eos)
    seen = {}

    def wrapped(request: httpx.Request):
        seen["url"], seen["body"] = str(request.url), json.loads(request.content)
        return handler(request)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(wrapped)) as http:
            return await client.send(http, BenchRequest("a b c", 3, 4), 0, 0.0)
    return asyncio.run(go()), seen


def test_completions_stream_with_usage():
    body = sse({"choices": [{"text": "x"}]}, {"choices": [{"text": ""}]}, {"choices": [{"text": "y"}]},
               {"choices": [{"text": "z", "finish_reason": "length"}]},
               {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, b"[DONE]")
    rec, seen = send(lambda r: httpx.Response(200, content=body), ignore_eos=True)
    assert seen["url"] == "http://server/v1/completions"
    assert seen["body"]["prompt"] == "a b c" and seen["body"]["max_tokens"] == 4 and seen["body"]["ignore_eos"]
    assert seen["body"]["stream"] and seen["body"]["stream_options"] == {"include_usage": True}
    assert rec.success and rec.error is None
    assert (rec.prompt_tokens, rec.completion_tokens, rec.usage_from_server) == (3, 4, True)
    assert len(rec.chunk_times_s) == 3 and len(rec.itl_s) == 2  # the empty chunk is no token arrival
    assert 0 <= rec.ttft_s <= rec.e2e_s
    assert rec.tpot_s == (rec.e2e_s - rec.ttft_s) / 3


def test_chat_deltas_and_no_usage():
    body = sse({"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"reasoning_content": "r"}}]},
               {"choices": [{"delta": {"content": "c"}}]}, b"[DONE]")
    rec, seen = send(lambda r: httpx.Response(200, content=body), endpoint="chat")
    assert seen["url"].endswith("/v1/chat/completions") and seen["body"]["messages"][0]["content"] == "a b c"
    assert "ignore_eos" not in seen["body"]
    assert rec.success and rec.completion_tokens == 2 and not rec.usage_from_server


def test_failures_are_records_not_exceptions():
    err = {"error": {"message": "prompt too long", "type": "invalid_request_error"}}
    rec, _ = send(lambda r: httpx.Response(400, json=err))
    assert not rec.success and rec.error == "HTTP 400: prompt too long"
    rec, _ = send(lambda r: httpx.Response(200, content=sse({"choices": [{"text": "x"}]}, err)))
    assert not rec.success and "prompt too long" in rec.error
    rec, _ = send(lambda r: httpx.Response(200, content=sse({"choices": [{"text": "x"}]})))  # cut off
    assert not rec.success and "[DONE]" in rec.error

    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)
    rec, _ = send(refuse)
    assert not rec.success and rec.error.startswith("ConnectError")


def test_base_url_forms():
    assert base_url_root("http://h:1/v1/") == base_url_root("http://h:1") == "http://h:1"
