"""lowbit/eval/metrics.py against closed forms and a float64 oracle."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.eval import metrics


def test_kl_divergence_matches_closed_form():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    kl = metrics.kl_divergence(metrics.log_probs(p.log()), metrics.log_probs(q.log()))
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)


def test_kl_divergence_matches_float64_oracle_per_position():
    torch.manual_seed(0)
    ref, other = 3 * torch.randn(7, 1000), 3 * torch.randn(7, 1000)
    kl = metrics.kl_divergence(metrics.log_probs(ref), metrics.log_probs(other))
    oracle = F.kl_div(F.log_softmax(other.double(), -1), F.log_softmax(ref.double(), -1), log_target=True,
                      reduction="none").sum(-1)  # KL(ref || other)
    torch.testing.assert_close(kl.double(), oracle, rtol=1e-5, atol=1e-6)
    assert (kl > 0).all()
    # the direction matters: KL(ref || other) is not KL(other || ref)
    assert not torch.allclose(kl, metrics.kl_divergence(metrics.log_probs(other), metrics.log_probs(ref)))


def test_kl_divergence_is_zero_for_identical_and_shift_invariant_logits():
    logits = torch.randn(5, 50)
    assert (metrics.kl_divergence(metrics.log_probs(logits), metrics.log_probs(logits)) == 0).all()
    kl = metrics.kl_divergence(metrics.log_probs(logits), metrics.log_probs(logits + 7.0))
    assert kl.abs().max() < 1e-5


def test_kl_divergence_ignores_tokens_the_reference_rules_out():
    ref = torch.tensor([[0.0, -float("inf")]])  # all mass on token 0
    other = torch.tensor([[0.0, 0.0]])  # half on each
    assert metrics.kl_divergence(metrics.log_probs(ref), metrics.log_probs(other)).item() == pytest.approx(math.log(2))


def test_kl_divergence_rejects_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        metrics.kl_divergence(torch.zeros(3, 10), torch.zeros(3, 11))


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    lp = metrics.log_probs(torch.zeros(6, 320))
    nll = metrics.token_nll(lp, torch.tensor([0, 5, 7, 319, 3, 3]))
    assert metrics.perplexity(nll) == pytest.approx(320, rel=1e-5)


def test_token_nll_picks_each_target():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    nll = metrics.token_nll(metrics.log_probs(logits), torch.tensor([2, 1]))
    expected = -F.log_softmax(logits.double(), -1)[[0, 1], [2, 1]]
    torch.testing.assert_close(nll.double(), expected)
    with pytest.raises(ValueError, match="targets"):
        metrics.token_nll(metrics.log_probs(logits), torch.tensor([1]))


def test_top1_agreement():
    ref = torch.tensor([[1.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    other = torch.tensor([[0.0, 9.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert metrics.top1_agreement(ref, other).tolist() == [True, False, True]


def test_summarize_reports_mean_p99_and_agreement():
    kl = np.arange(1, 201, dtype=np.float64)  # 1..200: p99 interpolates between 198 and 199
    out = metrics.summarize(np.full(200, math.log(10.0)), ref_nll=np.full(200, math.log(5.0)), kl=kl,
                            agree=np.array([True] * 150 + [False] * 50))
    assert out["perplexity"] == pytest.approx(10.0)
    assert out["reference_perplexity"] == pytest.approx(5.0)
    assert out["kld_mean"] == pytest.approx(100.5)
    assert out["kld_p99"] == pytest.approx(198.01)
    assert out["kld_max"] == 200
    assert out["top1_agreement"] == pytest.approx(0.75)
    assert set(metrics.summarize(np.zeros(3))) == {"perplexity"}
