"""The deepseek-r1 reasoning parser on strings (whole and delta by delta, tags cut anywhere), and over HTTP with a
scripted engine: reasoning_content and content in messages and in stream deltas."""
import itertools

import openai
import pytest
from fastapi.testclient import TestClient

from lowbit.server.api import ServerSettings, build_app
from lowbit.server.engine_loop import EngineLoop
from lowbit.server.metrics import Metrics
from lowbit.server.reasoning import DeepSeekR1ReasoningParser

from .fake_engine import FakeEngine

REPLY = "<think>Two plus two.\nThat is 4.</think>\n\nThe answer is 4."


@pytest.mark.parametrize("text, reasoning, content", [
    (REPLY, "Two plus two.\nThat is 4.", "\n\nThe answer is 4."),
    ("the template opened it</think>answer", "the template opened it", "answer"),  # no <think> in the reply
    ("cut short while thinking", "cut short while thinking", ""),  # no </think>: all reasoning
    ("<think>a</think>b</think><think>c", "a", "b</think><think>c"),  # after the reasoning, tags are content
    ("", "", ""),
])
def test_split_a_whole_reply(text, reasoning, content):
    assert DeepSeekR1ReasoningParser().split(text) == (reasoning, content)


def stream(pieces):
    s = DeepSeekR1ReasoningParser().streamer()
    outs = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(r for r, _ in outs), "".join(c for _, c in outs), outs


@pytest.mark.parametrize("text", [REPLY, "no open tag</think>answer", "<think>unfinished <thi", "a < b </thin"])
def test_streaming_any_cut_of_the_reply_gives_the_whole_split(text):
    want = DeepSeekR1ReasoningParser().split(text)
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        assert stream([text[:i], text[i:j], text[j:]])[:2] == want, (i, j)
    assert stream(list(text))[:2] == want  # one character at a time


def test_a_tag_split_across_deltas_is_held_back_until_it_is_known():
    _, _, outs = stream(["<th", "ink>Hmm</th", "ink>Yes", " <b>"])
    assert outs == [("", ""), ("Hmm", ""), ("", "Yes"), ("", " <b>"), ("", "")]
    _, _, outs = stream(["I think a </", "b> is html"])  # not a tag after all: released with the next delta
    assert outs == [("I think a ", ""), ("</b> is html", ""), ("", "")]


SCRIPT = ["<th", "ink>", "Two plus", " two.</", "think>", "It is", " 4."]


@pytest.fixture
def client_for():
    clients = []

    def make(reasoning_parser):
        engine = FakeEngine(SCRIPT)
        settings = ServerSettings(model_name="fake-r1", reasoning_parser=reasoning_parser)
        metrics = Metrics("fake-r1")
        http = TestClient(build_app(EngineLoop(engine, metrics), settings, metrics))
        http.__enter__()  # runs the lifespan: starts the engine thread
        clients.append(http)
        return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    yield make
    for http in clients:
        http.__exit__(None, None, None)


def test_reasoning_content_in_the_chat_message(client_for):
    r = client_for("deepseek-r1").chat.completions.create(model="fake-r1", messages=[{"role": "user",
                                                                                     "content": "2+2?"}])
    msg = r.choices[0].message
    assert msg.reasoning_content == "Two plus two." and msg.content == "It is 4."
    assert r.usage.completion_tokens == len(SCRIPT) and r.choices[0].finish_reason == "stop"


def test_reasoning_content_in_stream_deltas(client_for):
    chunks = list(client_for("deepseek-r1").chat.completions.create(
        model="fake-r1", messages=[{"role": "user", "content": "2+2?"}], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
    assert "".join(r or "" for r in reasoning) == "Two plus two."
    assert "".join(d.content or "" for d in deltas) == "It is 4."
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(r is None for r in reasoning[first_content:])  # reasoning first, then the answer
    assert sum(r is not None for r in reasoning) == 2  # "Two plus", " two." as they came


def test_without_a_parser_the_tags_stay_in_the_content(client_for):
    r = client_for(None).chat.completions.create(model="fake-r1", messages=[{"role": "user", "content": "2+2?"}])
    assert r.choices[0].message.content == "".join(SCRIPT)
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
