"""The `lowbit eval` driver: runs a reference and one or more models over held-out text, window by window, and
hands their logits to the pure functions of `lowbit/eval/metrics.py`.

Windowing: the text is tokenized once and cut into non-overlapping windows of `window` tokens (the tokenizer's
BOS first when it adds one). Each window is one forward pass; its logits at positions 0..n-2 predict its tokens
1..n-1, so the first token of a window is context only and every other token is scored exactly once. `max_tokens`
counts scored tokens; the last window is cut short to hit it exactly.

One model is in memory at a time: the reference runs first and its log-probabilities are kept on the host
([tokens, vocab] float32: 0.8 GB for 4,096 tokens of a 49,152-token vocabulary), then each model is loaded,
scored against them and freed. Several models measured in one call share one pass of the reference.
"""
from __future__ import annotations

import gc
import importlib.resources
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.eval import metrics

DEFAULT_TEXT = "gpl-3.txt"  # package data in lowbit/data/eval/: the GNU GPL v3, English prose not used for calibration
DEFAULT_WINDOW = 512  # llama.cpp's perplexity default context
DEFAULT_MAX_TOKENS = 4096
DEFAULT_NAME = "default"  # --model/--reference default: the embedded default model (unless a file has that name)


@dataclass
class ModelResult:
    model: str
    metrics: dict
    seconds: float

    def as_dict(self) -> dict:
        return {"model": self.model, **self.metrics, "seconds": round(self.seconds, 2)}


def read_text(path: str | None) -> tuple[str, str]:
    """(name, text): the file at `path`, or the built-in held-out text when None. Raises OSError/ValueError."""
    if path is None:
        res = importlib.resources.files("lowbit") / "data" / "eval" / DEFAULT_TEXT
        return f"built-in {DEFAULT_TEXT}", res.read_text(encoding="utf-8")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"--text {path}: not UTF-8 text") from None
    except OSError as e:
        raise OSError(f"--text {path}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        raise ValueError(f"--text {path}: the file is empty")
    return path, text


def bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text of its own accord (e.g. [BOS]); [] when none."""
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    full = tokenizer.encode("Hello", add_special_tokens=True)
    n = len(full) - len(plain)
    return list(full[:n]) if n > 0 and full[n:] == plain else []


def token_windows(text_ids: list[int], window: int, max_tokens: int | None, prefix: list[int] = ()) -> list[list[int]]:
    """Non-overlapping windows of at most `window` tokens (each starting with `prefix`) that score
    min(max_tokens, what the text holds) tokens in all; max_tokens None means the whole text."""
    if window < 2 + len(prefix):
        raise ValueError(f"--window must be at least {2 + len(prefix)} tokens, got {window}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {max_tokens}")
    prefix = list(prefix)
    windows, scored, i = [], 0, 0
    while i < len(text_ids) and (max_tokens is None or scored < max_tokens):
        take = window - len(prefix)
        if max_tokens is not None:
            # a window scores len - 1 tokens: all its text tokens with a prefix, all but the first without
            take = min(take, max_tokens - scored + (0 if prefix else 1))
        w = prefix + text_ids[i:i + take]
        if len(w) < 2:
            break
        windows.append(w)
        scored += len(w) - 1
        i += take
    return windows


def _load(model: str | None, window: int, device: str | None, dtype: str):
    from lowbit import LLM
    return LLM(model, dtype=dtype, device=device, max_model_len=max(window, 4096),
               max_num_batched_tokens=max(window, 8192))


def _collect() -> None:
    """Give back a dropped model's memory now, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _name(model: str | None) -> str:
    return DEFAULT_NAME if model is None else model


def _resolve(model: str | None) -> str | None:
    """None for the embedded default model; else the path, checked to exist."""
    if model is None or (model == DEFAULT_NAME and not os.path.exists(model)):
        return None
    if not os.path.exists(model):
        raise FileNotFoundError(f"{model}: no such file or directory")
    return model


def _vocab_and_tokenizer(model: str | None):
    """(vocabulary size, tokenizer or None) read from a model's files, without its weights."""
    from lowbit.config import resolve_model_path
    from lowbit.models.loader import Checkpoint
    from lowbit.tokenizer import load_tokenizer
    path = resolve_model_path(model)
    return Checkpoint(path).model_config().vocab_size, load_tokenizer(path)


def _check_same_tokenizer(models: list[str | None], first: str | None, first_role: str, text: str
                          ) -> tuple[list[int], list[int]]:
    """(the text's token ids, the BOS prefix) under `first`'s tokenizer, once every model is checked to share it;
    reads configs and tokenizers only, so a mismatch fails before any model runs."""
    vocab0, tok0 = _vocab_and_tokenizer(first)
    if tok0 is None:
        raise ValueError(f"{_name(first)} has no tokenizer files: cannot tokenize the text")
    ids = tok0.encode(text, add_special_tokens=False)
    for m in models:
        if m == first:
            continue
        vocab, tok = _vocab_and_tokenizer(m)
        if vocab != vocab0:
            raise ValueError(f"{_name(m)} has a vocabulary of {vocab} tokens and {first_role} {_name(first)} "
                             f"of {vocab0}: they must share a tokenizer")
        if tok is not None and tok.encode(text, add_special_tokens=False) != ids:
            raise ValueError(f"{_name(m)} tokenizes the text differently from {first_role} {_name(first)}: "
                             f"they must share a tokenizer")
    return ids, bos_prefix(tok0)


def _run(llm, windows: list[list[int]], ref_logprobs: list[torch.Tensor] | None, keep: bool):
    """Per-position NLL (and KL / top-1 against the reference's log-probs); the log-probs themselves if `keep`."""
    nll, kl, agree, kept = [], [], [], []
    for k, w in enumerate(windows):
        lp = metrics.log_probs(llm.logits(w)[:-1])  # [n-1, V]: position i predicts token i+1
        nll.append(metrics.token_nll(lp, torch.tensor(w[1:])))
        if ref_logprobs is not None:
            kl.append(metrics.kl_divergence(ref_logprobs[k], lp))
            agree.append(metrics.top1_agreement(ref_logprobs[k], lp))
        if keep:
            kept.append(lp)
    cat = (lambda xs: torch.cat(xs).numpy() if xs else None)  # noqa: E731
    return metrics.summarize(cat(nll), kl=cat(kl), agree=cat(agree)), kept


def evaluate(models: list[str | None], reference: str | None = None, text_path: str | None = None,
             max_tokens: int | None = DEFAULT_MAX_TOKENS, window: int = DEFAULT_WINDOW, device: str | None = None,
             dtype: str = "auto", log: Callable[[str], None] = lambda s: None) -> dict:
    """Perplexity of each model (and of the reference), and with a reference: mean/p99/max KL(reference || model)
    per scored token and top-1 agreement. Returns the report `lowbit eval --json` prints.

    A model given as None or "default", or a reference given as "default", is the embedded default model;
    reference=None means no reference."""
    if not models:
        raise ValueError("no model to evaluate")
    text_name, text = read_text(text_path)
    has_ref = reference is not None
    reference = _resolve(reference) if has_ref else None
    models = [_resolve(m) for m in models]
    # the reference (or, without one, the first model) fixes the tokenization every model is checked against
    first = reference if has_ref else models[0]
    text_ids, prefix = _check_same_tokenizer(models, first, "the reference" if has_ref else "the first model", text)
    windows = token_windows(text_ids, window, max_tokens, prefix)
    if not windows:
        raise ValueError(f"{text_name}: too short to score a token")
    scored = sum(len(w) - 1 for w in windows)
    log(f"text: {text_name}, {scored} tokens scored in {len(windows)} window(s) of <= {window}")
    report = {"text": text_name, "tokens": scored, "windows": len(windows), "window": window,
              "reference": None, "results": []}

    ref_logprobs = None
    if has_ref:
        t0 = time.perf_counter()
        summary, ref_logprobs = _run(_load(reference, window, device, dtype), windows, None, keep=True)
        _collect()
        report["reference"] = ModelResult(_name(reference), summary, time.perf_counter() - t0).as_dict()
        log(f"reference {_name(reference)}: perplexity {summary['perplexity']:.4f} "
            f"({report['reference']['seconds']} s)")
    for model in models:
        t0 = time.perf_counter()
        summary, _ = _run(_load(model, window, device, dtype), windows, ref_logprobs, keep=False)
        _collect()
        result = ModelResult(_name(model), summary, time.perf_counter() - t0)
        report["results"].append(result.as_dict())
        log(f"{result.model}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items())
            + f" ({result.seconds:.1f} s)")
    return report
