"""The OpenAI API of `lowbit serve`, driven by the official openai client against the real server; every answer is
checked against the offline engine (`LLM.generate` / `LLM.chat` / `LLM.logits` on the same model)."""
import json
import os
import shutil
import subprocess

import httpx
import openai
import pytest
import torch

import lowbit.server
from lowbit import SamplingParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def test_models_lists_the_served_model(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_completion_equals_offline_generate(client, model_name, default_llm):
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=12)
    ref = default_llm.generate(PROMPT, greedy(12))[0]
    assert r.object == "text_completion" and r.model == model_name
    assert r.choices[0].text == ref.text and ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) == len(default_llm.tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_equals_offline_chat(client, model_name, default_llm):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=24)
    ref = default_llm.chat(MESSAGES, greedy(24))[0]
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text and "Paris" in ref.text
    assert r.choices[0].finish_reason == ref.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(default_llm.engine.apply_chat_template(MESSAGES))
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_max_completion_tokens_limits_a_chat_reply(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_streamed_completion_joins_to_the_non_streamed_text(client, model_name):
    kw = dict(model=model_name, prompt="Once upon a time", temperature=0, max_tokens=24)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) > 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert sum(len(c.choices) for c in chunks) > 3  # it really streamed


def test_streamed_chat_joins_to_the_non_streamed_text(client, model_name):
    kw = dict(model=model_name, messages=[{"role": "user", "content": "Tell me about the sea."}], temperature=0,
              max_tokens=32)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_are_the_seeded_samples_of_offline_generate(client, model_name, default_llm):
    kw = dict(model=model_name, prompt=PROMPT, n=3, temperature=0.9, seed=7, max_tokens=10, logprobs=0)
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    ref = default_llm.generate([PROMPT] * 3, [SamplingParams(temperature=0.9, seed=7 + i, max_tokens=10)
                                              for i in range(3)])
    assert [c.text for c in r.choices] == [o.text for o in ref]
    assert len({c.text for c in r.choices}) > 1  # different seeds, different samples
    assert r.usage.prompt_tokens == len(ref[0].prompt_token_ids)  # the prompt counts once
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices) == sum(
        len(o.token_ids) for o in ref)
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_completion_logprobs_equal_offline(client, model_name, default_llm):
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=3)
    ref = default_llm.generate(PROMPT, greedy(6, logprobs=3))[0]
    lp = r.choices[0].logprobs
    decode = lambda t: default_llm.tokenizer.decode([t])  # noqa: E731
    assert lp.tokens == [decode(t) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([x[0] for x in ref.logprobs], abs=1e-4)
    for top, (chosen, ref_top) in zip(lp.top_logprobs, ref.logprobs):
        assert len(ref_top) == 3 and set(top) >= {decode(t) for t, _ in ref_top}
        for t, v in ref_top:
            assert top[decode(t)] == pytest.approx(v, abs=1e-4)
        assert max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: the chosen token is the best
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_logprobs_and_top_logprobs(client, model_name, default_llm):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=16,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens  # every token, the end-of-turn token included
    assert r.choices[0].finish_reason == "stop" and content[-1].token == default_llm.tokenizer.eos_token
    assert "".join(t.token for t in content[:-1]) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


def test_echo_scores_the_prompt_as_offline_logits(client, model_name, default_llm):
    r = client.completions.create(model=model_name, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    ids = default_llm.tokenizer.encode(PROMPT)
    want = torch.log_softmax(default_llm.logits(ids)[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
    assert "".join(lp.tokens) == PROMPT


def test_prompt_as_a_batch_of_token_ids(client, model_name, default_llm):
    prompts = ["The capital of France is", "Water boils at"]
    ids = [default_llm.tokenizer.encode(p) for p in prompts]
    r = client.completions.create(model=model_name, prompt=ids, temperature=0, max_tokens=8)
    ref = default_llm.generate(prompts, greedy(8))
    assert [c.text for c in r.choices] == [o.text for o in ref]
    assert r.usage.prompt_tokens == sum(map(len, ids))


def test_stop_string_ends_the_text_before_it(client, model_name, default_llm):
    full = default_llm.generate(PROMPT, greedy(12))[0].text
    stop = full.strip().split()[1]  # a word that the greedy text contains
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0, max_tokens=12, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_tokenizer_endpoints_round_trip(server, default_llm):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert ids == default_llm.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == default_llm.tokenizer.eos_token and "im_start" in info["chat_template"]


def test_health(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readme_curl_for_chat_works_as_written(server):
    """The chat curl of lowbit/server/README_SECTION.md, run as written but against this test's port."""
    readme = open(os.path.join(os.path.dirname(lowbit.server.__file__), "README_SECTION.md")).read()
    block = next(b for b in readme.split("```bash\n")[1:] if b.startswith("curl"))
    command = block.split("```")[0].replace("http://127.0.0.1:8000", server.url)
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    reply = json.loads(r.stdout)
    assert r.returncode == 0 and reply["object"] == "chat.completion"
    assert "Paris" in reply["choices"][0]["message"]["content"]
