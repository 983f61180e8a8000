"""`lowbit serve --tensor-parallel-size 2 --expert-parallel` as torchrun starts it (two processes, each given
RANK / WORLD_SIZE / MASTER_ADDR, gloo on the CPU): rank 0 serves, the other rank follows its batches. Greedy texts,
streamed or not, concurrent or not, and prompt logprobs equal one process's; SIGTERM to every rank (what torchrun
does) ends both with exit code 0."""
import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from lowbit import LLM, SamplingParams
from tests.conftest import VARIANTS, hf_classes
from tests.eval.conftest import save_byte_tokenizer

from .conftest import free_port

PROMPTS = ["Hello world", "The capital of France is", "1 2 3 4 5", "abcabcabc", "Once upon a time"]
MAX_TOKENS = 12
WORLD = 2


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """The tiny random deepseek_v3 (8 experts, MLA, YaRN) with a 256-token vocabulary and the byte tokenizer, so
    every generated token is text."""
    path = tmp_path_factory.mktemp("tiny_moe")
    family, kw = VARIANTS["deepseek_v3"]
    config_cls, model_cls = hf_classes(family)
    torch.manual_seed(0)
    model_cls(config_cls(**dict(kw, vocab_size=256))).eval().save_pretrained(str(path))
    save_byte_tokenizer(path)
    return str(path)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def start_ranks(model: str, port: int, tmp_path) -> list[tuple[subprocess.Popen, str]]:
    master = free_port()
    ranks = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master),
                   OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        log = str(tmp_path / f"rank{rank}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lowbit", "serve", "--model", model, "--port", str(port), "--device", "cpu",
                 "--tensor-parallel-size", str(WORLD), "--expert-parallel", "--kv-cache-memory-gb", "0.01",
                 "--max-model-len", "256"], stdout=f, stderr=subprocess.STDOUT, env=env)
        ranks.append((proc, log))
    return ranks


def wait_ready(url: str, ranks, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in ranks:
            if proc.poll() is not None:
                raise RuntimeError(f"a rank exited with {proc.returncode}:\n{read(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("rank 0 did not come up:\n" + "\n".join(read(log) for _, log in ranks))


def test_parallel_server_answers_as_one_process_and_every_rank_exits_0_on_sigterm(tiny_moe, tmp_path):
    port = free_port()
    ranks = start_ranks(tiny_moe, port, tmp_path)
    try:
        # the reference, computed while the ranks load
        llm = LLM(tiny_moe, device="cpu")
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        want = [o.text for o in llm.generate(PROMPTS, greedy)]
        scored = llm.engine.encode(PROMPTS[1])
        want_lp = torch.log_softmax(llm.logits(scored), -1)[:-1].gather(1, torch.tensor(scored[1:])[:, None])[:, 0]
        assert any(want), "a test of texts needs some text"

        url = f"http://127.0.0.1:{port}"
        wait_ready(url, ranks)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        name = client.models.list().data[0].id

        def complete(prompt: str) -> str:
            return client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0).choices[0].text

        assert complete(PROMPTS[0]) == want[0]  # alone
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched together
            assert list(pool.map(complete, PROMPTS)) == want
        stream = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream) == want[4]
        # prompt logprobs: a batch of every position's logits (the scoring path) on both ranks
        r = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=1)
        got_lp = torch.tensor(r.choices[0].logprobs.token_logprobs[1:len(scored)])
        assert (got_lp - want_lp).abs().max().item() <= 1e-4
    finally:
        for proc, _ in ranks:  # as torchrun forwards a SIGTERM: to every rank
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc, _ in ranks:
            try:
                codes.append(proc.wait(60))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
    logs = [read(log) for _, log in ranks]
    assert codes == [0] * WORLD, "\n".join(logs)
    assert "Application shutdown complete" in logs[0]
    assert "Traceback" not in logs[1]
