"""What quantization cost, as pure functions of logits: perplexity, KL divergence per position, top-1 agreement.

No models and no I/O here: `lowbit/eval/runner.py` runs the models and feeds these functions one window at a time.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from logits, float32: [T, V] -> [T, V]."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token: logprobs [T, V], targets [T] -> [T]."""
    if logprobs.shape[0] != targets.shape[0]:
        raise ValueError(f"{logprobs.shape[0]} positions of logits for {targets.shape[0]} targets")
    return -logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [T]


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) in nats at each position: sum_v P_ref(v) (log P_ref(v) - log P(v)); [T, V] x2 -> [T].

    Positions where the reference puts all of its mass on tokens the other model gives zero probability get inf.
    """
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"logits of different shapes: {tuple(ref_logprobs.shape)} and {tuple(logprobs.shape)}")
    p = ref_logprobs.exp()  # [T, V]
    # 0 * log 0 is 0: where the reference gives a token no mass, it adds nothing whatever the other model says
    terms = torch.where(p > 0, p * (ref_logprobs - logprobs), torch.zeros((), dtype=p.dtype))  # [T, V]
    return terms.sum(-1)  # [T]


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether both models' most likely next token is the same at each position: [T, V] x2 -> bool [T]."""
    return ref_logits.argmax(-1) == logits.argmax(-1)


def perplexity(nll: torch.Tensor | np.ndarray) -> float:
    """exp(mean negative log-likelihood) over all scored tokens."""
    return math.exp(float(np.mean(np.asarray(nll, dtype=np.float64))))


def percentile(values: torch.Tensor | np.ndarray, q: float) -> float:
    """The q-th percentile (0..100) of per-position values, linearly interpolated (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(nll: np.ndarray, ref_nll: np.ndarray | None = None, kl: np.ndarray | None = None,
              agree: np.ndarray | None = None) -> dict:
    """The numbers `lowbit eval` reports for one model from its per-position values (all over the same tokens).

    Keys: perplexity; with a reference also reference_perplexity, kld_mean, kld_p99, kld_max, top1_agreement.
    """
    out = {"perplexity": perplexity(nll)}
    if ref_nll is not None:
        out["reference_perplexity"] = perplexity(ref_nll)
    if kl is not None:
        kl = np.asarray(kl, dtype=np.float64)
        out.update(kld_mean=float(kl.mean()), kld_p99=percentile(kl, 99), kld_max=float(kl.max()))
    if agree is not None:
        out["top1_agreement"] = float(np.asarray(agree, dtype=np.float64).mean())
    return out
