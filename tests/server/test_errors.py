"""Every error the server answers, in OpenAI's shape {"error": {"message", "type", "param", "code"}}, against a
server started with an API key, one running sequence, one waiting place, a small body limit and context."""
import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from lowbit.server.api import ServerSettings, build_app
from lowbit.server.engine_loop import EngineLoop
from lowbit.server.metrics import Metrics

from .conftest import serve, wait_for
from .fake_engine import FakeEngine

KEY = "sk-lowbit-test"
MAX_MODEL_LEN = 256
MAX_BODY = 16384


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("strict"), "--api-key", KEY, "--max-num-seqs", "1", "--max-waiting", "1",
               "--max-body-bytes", str(MAX_BODY), "--max-model-len", str(MAX_MODEL_LEN)) as s:
        yield s


@pytest.fixture(scope="module")
def client(strict_server):
    return openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def post(server, path, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, type_: str, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_ and body["error"]["message"]
    assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("field, value", [("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("n", 0),
                                          ("logprobs", 21), ("max_tokens", -5), ("stop", 7)])
def test_an_invalid_field_is_a_400_naming_it(strict_server, model, field, value):
    r = post(strict_server, "/v1/completions", {"model": model, "prompt": "hi", field: value})
    err = assert_error(r, 400, "invalid_request_error", param=field, code=400)
    assert field in err["message"]


def test_a_missing_field_and_bad_json_are_400_not_422(strict_server, model):
    assert_error(post(strict_server, "/v1/chat/completions", {"model": model}), 400, "invalid_request_error",
                 param="messages")
    r = httpx.post(f"{strict_server.url}/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert "JSON" in assert_error(r, 400, "invalid_request_error")["message"]


def test_the_openai_client_sees_a_bad_request(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert e.value.status_code == 400 and "top_logprobs" in e.value.body["message"]


def test_prompt_plus_max_tokens_over_the_model_length_is_a_400(strict_server, model):
    r = post(strict_server, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": MAX_MODEL_LEN})
    err = assert_error(r, 400, "invalid_request_error", param="max_tokens", code="context_length_exceeded")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    r = post(strict_server, "/v1/chat/completions",
             {"model": model, "messages": [{"role": "user", "content": long_prompt}]})
    assert_error(r, 400, "invalid_request_error", param="max_tokens", code="context_length_exceeded")


def test_an_unknown_model_is_a_404(client, strict_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-7", prompt="hi", max_tokens=1)
    assert e.value.status_code == 404
    r = post(strict_server, "/v1/completions", {"model": "gpt-7", "prompt": "hi"})
    assert "gpt-7" in assert_error(r, 404, "not_found_error", param="model", code="model_not_found")["message"]


def test_a_body_over_the_limit_is_a_413(strict_server, model):
    big = {"model": model, "prompt": "x" * (MAX_BODY + 1)}
    assert_error(post(strict_server, "/v1/completions", big), 413, "invalid_request_error",
                 code="request_too_large")

    def chunked():  # no Content-Length: the server counts as it reads
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]
    r = httpx.post(f"{strict_server.url}/v1/completions", content=chunked(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_error(r, 413, "invalid_request_error", code="request_too_large")


def test_a_full_waiting_queue_is_a_429(strict_server, client, model):
    """One sequence runs (--max-num-seqs 1), one waits (--max-waiting 1): the next request is refused."""
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    metrics = lambda: strict_server.metrics(headers)  # noqa: E731
    with httpx.stream("POST", f"{strict_server.url}/v1/completions", json=body, headers=headers, timeout=60):
        wait_for(lambda: metrics()["lowbit:num_requests_running"] == 1, what="one running")
        with httpx.stream("POST", f"{strict_server.url}/v1/completions", json=body, headers=headers, timeout=60):
            wait_for(lambda: metrics()["lowbit:num_requests_waiting"] == 1, what="one waiting")
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=model, prompt="hi", max_tokens=1)
            assert e.value.status_code == 429
            r = post(strict_server, "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert_error(r, 429, "rate_limit_error", code="queue_full")
    wait_for(lambda: metrics()["lowbit:kv_cache_usage_perc"] == 0, what="both streams aborted")
    assert client.completions.create(model=model, prompt="hi", max_tokens=1).usage.completion_tokens == 1


def test_a_missing_or_wrong_api_key_is_a_401(strict_server, model):
    for key in (None, "sk-wrong"):
        r = post(strict_server, "/v1/completions", {"model": model, "prompt": "hi"}, key=key)
        assert_error(r, 401, "authentication_error", code="invalid_api_key")
        assert_error(httpx.get(f"{strict_server.url}/v1/models"), 401, "authentication_error")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    # probes and scrapers need no key
    assert httpx.get(f"{strict_server.url}/health").status_code == 200
    assert httpx.get(f"{strict_server.url}/metrics").status_code == 200


def test_errors_are_counted_by_status(strict_server):
    m = strict_server.metrics()
    for status in ("400", "401", "404", "413", "429"):
        assert any(k.startswith("lowbit:http_requests_total") and f'status="{status}"' in k for k in m), status


def test_while_draining_every_request_is_a_503():
    """After SIGTERM (see test_cli), requests on connections still open are refused with 503."""
    metrics = Metrics("fake")
    app = build_app(EngineLoop(FakeEngine(["a"])), ServerSettings(model_name="fake"), metrics)
    with TestClient(app) as http:
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
        app.state.draining = True
        for r in (http.post("/v1/completions", json={"prompt": "hi"}), http.get("/health")):
            assert_error(r, 503, "server_error", code="shutting_down")
