"""One engine loop under many HTTP requests: concurrent streams are batched together and each equals the offline
engine's output; a client that goes away has its request aborted and its KV blocks freed."""
import asyncio
import concurrent.futures
import json

import httpx
import openai
import pytest

from lowbit import SamplingParams

from .conftest import wait_for

NUM_STREAMS = 32
MAX_TOKENS = 16


def _abort_count(server, model_name) -> float:
    return server.metrics().get(
        f'lowbit:request_success_total{{finished_reason="abort",model_name="{model_name}"}}', 0.0)


def _idle(server):
    m = server.metrics()
    return m["lowbit:num_requests_running"] == 0 and m["lowbit:kv_cache_usage_perc"] == 0 and m


async def _stream_all(url: str, model: str, prompts: list[str]):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(prompt):
        text, tokens, usage = "", [], None
        stream = await client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                                 logprobs=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                tokens += c.logprobs.tokens if c.logprobs else []
        return text, tokens, usage

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def test_concurrent_greedy_streams_are_batched_and_equal_offline(server, model_name, default_llm):
    prompts = [f"Fact number {i}: the number {i} is" for i in range(NUM_STREAMS)]
    results = asyncio.run(_stream_all(server.url, model_name, prompts))
    refs = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    decode = default_llm.tokenizer.decode
    for (text, tokens, usage), ref in zip(results, refs):
        assert tokens == [decode([t]) for t in ref.token_ids]  # the same tokens, one by one
        assert text == ref.text
        assert usage.completion_tokens == len(ref.token_ids) and usage.prompt_tokens == len(ref.prompt_token_ids)
    m = server.metrics()
    assert m["lowbit:num_requests_running_max"] > 1  # requests from different connections shared a batch
    assert m["lowbit:batch_size_sum"] > m["lowbit:batch_size_count"]  # mean sequences per step > 1
    assert m["lowbit:generation_tokens_total"] >= sum(len(r.token_ids) for r in refs)
    assert m["lowbit:time_to_first_token_seconds_count"] >= NUM_STREAMS
    print(f"{NUM_STREAMS} streams: at most {m['lowbit:num_requests_running_max']:.0f} running together, "
          f"{m['lowbit:batch_size_sum'] / m['lowbit:batch_size_count']:.1f} sequences per step on average")
    wait_for(lambda: _idle(server), what="the engine to go idle")


def _complete(url, model, max_tokens):
    r = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": "Count with me: one, two,", "temperature": 0, "max_tokens": max_tokens,
        "ignore_eos": True})
    return r.json()["usage"]["completion_tokens"]


def test_a_dropped_stream_is_aborted_and_frees_its_kv_blocks(server, model_name):
    aborted = _abort_count(server, model_name)
    body = {"model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert json.loads(next(line for line in lines if line.startswith("data:"))[5:])["choices"]
            others = [pool.submit(_complete, server.url, model_name, 24) for _ in range(3)]
            wait_for(lambda: server.metrics()["lowbit:num_requests_running"] >= 2, what="the others to run")
            assert server.metrics()["lowbit:kv_cache_usage_perc"] > 0
        # the stream is closed here, 1999 tokens short of its max_tokens
        assert [f.result() for f in others] == [24, 24, 24]
    m = wait_for(lambda: _idle(server), timeout=30, what="KV usage back at 0")
    assert m["lowbit:kv_cache_usage_perc"] == 0
    assert _abort_count(server, model_name) == aborted + 1


def test_a_client_that_times_out_on_a_plain_request_is_aborted(server, model_name):
    aborted = _abort_count(server, model_name)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=3, json={
            "model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True})
    wait_for(lambda: _idle(server), timeout=30, what="KV usage back at 0")
    assert _abort_count(server, model_name) == aborted + 1
