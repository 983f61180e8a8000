"""Benchmark prompts: random ones of exact token lengths (TensorRT-LLM's token-norm-dist), or a ShareGPT file.

Random prompts are strings of whole-word tokens (" apple", " river", ...) that the tokenizer encodes back to
exactly themselves, so a prompt of N such tokens is N tokens as the server counts them (before any special tokens
the server adds). Each request gets its own random words, so no two prompts share a cacheable prefix.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: str
    input_len: int  # prompt tokens by the tokenizer, without special tokens
    output_len: int  # max_tokens asked for


def sample_lengths(mean: int, stdev: float, n: int, rng: np.random.Generator, low: int = 1) -> list[int]:
    """n lengths from a normal distribution (stdev 0: all exactly `mean`), rounded, at least `low`."""
    if mean < low:
        raise ValueError(f"a length must be >= {low}, got {mean}")
    if stdev < 0:
        raise ValueError(f"a length stdev must be >= 0, got {stdev}")
    if stdev == 0:
        return [mean] * n
    return [max(low, int(round(x))) for x in rng.normal(mean, stdev, n)]


def word_tokens(tokenizer) -> list[int]:
    """Ids of tokens that are one space-prefixed lowercase ASCII word and encode back to exactly themselves."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    cands = [i for s, i in vocab.items()
             if len(s) > 2 and s[0] in "Ġ▁" and s[1:].isascii() and s[1:].isalpha() and s[1:].islower()
             and i not in special]
    cands.sort()
    words = []
    if cands:  # transformers >= 5.24 fails on an empty batch rather than returning one
        texts = tokenizer.batch_decode([[i] for i in cands])
        encoded = tokenizer(texts, add_special_tokens=False).input_ids
        words = [i for i, e in zip(cands, encoded) if list(e) == [i]]
    if len(words) < 100:
        words = letter_tokens(tokenizer)
    if len(words) < 26:
        raise ValueError("this tokenizer has too few whole-word or single-letter tokens to build random prompts; "
                         "use --dataset sharegpt FILE")
    return words


def letter_tokens(tokenizer) -> list[int]:
    """Ids of tokens that are one ASCII letter and encode back to exactly themselves: the prompt alphabet of
    tokenizers with no whole words (a byte-level tokenizer without merges, as the random test checkpoints have)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    encoded = tokenizer(letters, add_special_tokens=False).input_ids
    return sorted({e[0] for e in encoded if len(e) == 1 and tokenizer.decode(e) in letters})


def _exact_prompt(tokenizer, words: list[int], n: int, rng: np.random.Generator) -> tuple[str, int]:
    """A prompt of n tokens from random words; (text, its token count), which is n unless the tokenizer merges
    across word boundaries, in which case a few rounds of trimming and topping up converge."""
    ids = [words[j] for j in rng.integers(0, len(words), n)]
    for _ in range(8):
        text = tokenizer.decode(ids)
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) == n:
            return text, n
        ids = enc[:n] if len(enc) > n else enc + [words[j] for j in rng.integers(0, len(words), n - len(enc))]
    return text, len(enc)


def random_requests(tokenizer, num_prompts: int, input_len: int, output_len: int, input_stdev: float = 0.0,
                    output_stdev: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    words = word_tokens(tokenizer)
    ins = sample_lengths(input_len, input_stdev, num_prompts, rng)
    outs = sample_lengths(output_len, output_stdev, num_prompts, rng)
    out = []
    for n_in, n_out in zip(ins, outs):
        text, actual = _exact_prompt(tokenizer, words, n_in, rng)
        out.append(BenchRequest(text, actual, n_out))
    return out


def _turns(entry: dict) -> list[str]:
    conv = entry.get("conversations") or entry.get("conversation") or []
    return [t.get("value") or t.get("content") or "" for t in conv if isinstance(t, dict)]


def sharegpt_requests(path: str, tokenizer, num_prompts: int, output_len: int | None = None, seed: int = 0,
                      max_input_len: int = 1024, max_total_len: int = 2048) -> list[BenchRequest]:
    """First human turn as the prompt; the first reply's token count as output_len unless `output_len` is given.
    Like vLLM's benchmark: conversations with fewer than 4 prompt or reply tokens, a prompt over `max_input_len`
    or prompt + reply over `max_total_len` are skipped."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such ShareGPT file")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}} entries")
    rng = np.random.default_rng(seed)
    out = []
    for k in rng.permutation(len(data)):
        turns = _turns(data[k]) if isinstance(data[k], dict) else []
        if len(turns) < 2:
            continue
        n_in = len(tokenizer.encode(turns[0], add_special_tokens=False))
        n_out = output_len or len(tokenizer.encode(turns[1], add_special_tokens=False))
        if n_in < 4 or n_out < 4 or n_in > max_input_len or n_in + n_out > max_total_len:
            continue
        out.append(BenchRequest(turns[0], n_in, n_out))
        if len(out) == num_prompts:
            break
    if not out:
        raise ValueError(f"{path}: no usable conversations (each needs a prompt and a reply of 4+ tokens)")
    return out
