"""Sampling: the filters against known answers, seeds, stop strings and stop tokens on the default model."""
import pytest
import torch

from lowbit import SamplingParams
from lowbit.engine.sampler import Sampler


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    s = Sampler()
    want = logits.argmax(-1).tolist()
    for p in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        assert [r.token_id for r in s(logits, [p] * 4, list(range(4)))] == want


def test_top_k_and_top_p_sample_only_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 1)
    s = Sampler()
    seen_k, seen_p = set(), set()
    for i in range(300):
        seen_k.add(s(logits, [SamplingParams(temperature=2.0, top_k=2)], [1000 + i])[0].token_id)
        # softmax of the logits: 0.636, 0.234, 0.086, ...: the first two reach 0.8
        seen_p.add(s(logits, [SamplingParams(temperature=1.0, top_p=0.8)], [2000 + i])[0].token_id)
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}


def test_seed_makes_sampling_reproducible_whatever_the_batch(default_llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    alone = default_llm.generate("Tell me a story.", p)[0].token_ids
    batched = default_llm.generate(["Hi", "Tell me a story.", "Count to ten"],
                                   [SamplingParams(temperature=1.0, max_tokens=5), p,
                                    SamplingParams(temperature=0.7, max_tokens=9)])[1].token_ids
    assert alone == batched
    other = default_llm.generate("Tell me a story.", SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12,
                                                                    seed=99, ignore_eos=True))[0].token_ids
    assert other != alone


def test_stop_string_cuts_the_text_and_stop_token_ends(default_llm):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = default_llm.generate("1, 2, 3, 4,", greedy)[0]
    assert " 6" in full.text
    cut = default_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=[" 6"]))[0]
    assert cut.text == full.text[:full.text.index(" 6")] and cut.finish_reason == "stop"
    tok = full.token_ids[3]
    by_id = default_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20,
                                                               stop_token_ids=[tok]))[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(tok) + 1] and by_id.finish_reason == "stop"
    assert default_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=3))[0].finish_reason == "length"


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(max_tokens=0),
                                dict(logprobs=50), dict(stop=[""])])
def test_invalid_sampling_params_name_the_field(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_greedy_rows_take_the_given_argmax_and_16_bit_logits_sample():
    """The decode graph hands its argmax ids and 16-bit logits: greedy rows take the ids, the others sample from the
    logits in float32."""
    logits = torch.tensor([[0.0, 9.0, 1.0], [8.0, 0.0, 0.0]], dtype=torch.bfloat16)
    s = Sampler()
    given = torch.tensor([2, 0])  # not the logits' argmax for row 0: proves the ids are what is used
    out = s(logits, [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1, logprobs=1)],
            [1, 2], given)
    assert [r.token_id for r in out] == [2, 0]
    assert out[1].logprob == pytest.approx(torch.log_softmax(logits[1].float(), -1)[0].item())
