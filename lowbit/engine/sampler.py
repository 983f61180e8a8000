"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    def __init__(self):
        self._generators: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq_id: int, seed: int | None, device) -> torch.Generator | None:
        if seed is None:
            return None
        g = self._generators.get(seq_id)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            self._generators[seq_id] = g
        return g

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seq_ids: list[int],
                 greedy_ids: torch.Tensor | None = None) -> list[SampleResult]:
        """logits [B, V] (float32, or the model's dtype) -> one SampleResult per row; greedy_ids: their argmax where
        it is computed already (the decode graph's)."""
        greedy = None
        if any(p.greedy for p in params):
            greedy = (greedy_ids if greedy_ids is not None else logits.argmax(dim=-1)).tolist()
        want_lp = any(p.logprobs is not None for p in params)
        logprobs = torch.log_softmax(logits.float(), dim=-1) if want_lp else None
        results = []
        for i, p in enumerate(params):
            if p.greedy:
                tok = greedy[i]
            else:
                tok = self._sample_row(logits[i].float(), p, self._generator(seq_ids[i], p.seed, logits.device))
            r = SampleResult(tok)
            if p.logprobs is not None:
                r.logprob = logprobs[i, tok].item()
                if p.logprobs > 0:
                    vals, ids = logprobs[i].topk(p.logprobs)
                    r.top_logprobs = list(zip(ids.tolist(), vals.tolist()))
            results.append(r)
        return results

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        x = logits / p.temperature  # [V]
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = x.topk(p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            probs = sorted_x.softmax(-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop = probs.cumsum(-1) - probs >= p.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(0, order, sorted_x)
        probs = x.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=gen).item())
