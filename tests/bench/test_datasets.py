"""Prompts of exact token lengths with the default model's tokenizer; ShareGPT files; arrival times."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lowbit.bench.datasets import random_requests, sample_lengths, sharegpt_requests
from lowbit.bench.runner import arrival_intervals


@pytest.fixture(scope="module")
def tokenizer():
    from lowbit.default_model import default_model_path
    from lowbit.tokenizer import load_tokenizer
    return load_tokenizer(default_model_path())


def test_random_prompts_have_exact_token_lengths(tokenizer):
    reqs = random_requests(tokenizer, 12, input_len=64, output_len=8, input_stdev=20, output_stdev=3, seed=1)
    assert len({r.prompt for r in reqs}) == 12  # no two alike
    for r in reqs:
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.input_len
        assert r.input_len >= 1 and r.output_len >= 1
    assert len({r.input_len for r in reqs}) > 1
    fixed = random_requests(tokenizer, 4, input_len=1000, output_len=1000, seed=0)  # token-norm-dist, stdev 0
    assert [r.input_len for r in fixed] == [1000] * 4 and [r.output_len for r in fixed] == [1000] * 4
    assert fixed == random_requests(tokenizer, 4, input_len=1000, output_len=1000, seed=0)  # seeded


def test_random_prompts_from_a_tokenizer_without_words(tmp_path):
    """A byte-level tokenizer with no merges (the random benchmark checkpoints'): prompts of single letters."""
    from lowbit.tokenizer import load_tokenizer
    from tests.quant.conftest import save_byte_tokenizer
    save_byte_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    reqs = random_requests(tok, 6, input_len=300, output_len=4, input_stdev=50, seed=2)
    assert len({r.prompt for r in reqs}) == 6
    for r in reqs:
        assert len(tok.encode(r.prompt, add_special_tokens=False)) == r.input_len


def test_sample_lengths():
    rng = np.random.default_rng(0)
    assert sample_lengths(7, 0, 3, rng) == [7, 7, 7]
    xs = sample_lengths(100, 10, 4000, rng)
    assert abs(np.mean(xs) - 100) < 1 and abs(np.std(xs) - 10) < 1 and all(isinstance(x, int) for x in xs)
    assert min(sample_lengths(2, 50, 200, rng)) == 1
    with pytest.raises(ValueError):
        sample_lengths(0, 0, 1, rng)


def test_sharegpt(tmp_path, tokenizer):
    long_reply = "the answer is " * 5
    data = [{"conversations": [{"from": "human", "value": "what is the capital of france, please?"},
                               {"from": "gpt", "value": long_reply}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_reply}]},  # too short
            {"conversations": [{"from": "human", "value": "only one turn here"}]},
            {"id": "x"}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(str(path), tokenizer, num_prompts=10)
    assert len(reqs) == 1
    assert reqs[0].input_len == len(tokenizer.encode(data[0]["conversations"][0]["value"], add_special_tokens=False))
    assert reqs[0].output_len == len(tokenizer.encode(long_reply, add_special_tokens=False))
    assert sharegpt_requests(str(path), tokenizer, 10, output_len=5)[0].output_len == 5
    path.write_text("{}")
    with pytest.raises(ValueError):
        sharegpt_requests(str(path), tokenizer, 10)


def test_arrivals():
    assert arrival_intervals(5, math.inf) == [0.0] * 5
    poisson = np.array(arrival_intervals(20000, request_rate=4.0, seed=0))
    assert abs(poisson.mean() - 0.25) < 0.01
    assert abs(poisson.std() / poisson.mean() - 1.0) < 0.03  # exponential: coefficient of variation 1
    even = np.array(arrival_intervals(20000, request_rate=4.0, burstiness=4.0, seed=0))
    assert abs(even.mean() - 0.25) < 0.01 and abs(even.std() / even.mean() - 0.5) < 0.03  # gamma: 1/sqrt(shape)
    with pytest.raises(ValueError):
        arrival_intervals(1, 0.0)
