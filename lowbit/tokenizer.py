"""Tokenizers: Hugging Face's, from a model folder or from a GGUF file's metadata (converted once, then cached)."""
from __future__ import annotations

import hashlib
import json
import os

from lowbit.config import ConfigError


def _cache_dir() -> str:
    return os.environ.get("LOWBIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lowbit"))


def load_tokenizer(path: str):
    """The tokenizer for a model folder or GGUF file; None when the folder has no tokenizer files."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if os.path.isfile(path) and path.endswith(".gguf"):
        st = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = os.path.join(_cache_dir(), "tokenizers", key)
        if os.path.exists(os.path.join(cached, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(cached)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        try:
            tmp = cached + f".tmp{os.getpid()}"
            tok.save_pretrained(tmp)
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only home: convert again next time
        return tok
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                               "tokenizer.model", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds here
        raise ConfigError(f"{path}: could not load the tokenizer ({e})") from None


def eos_token_ids(tokenizer, config_eos: list[int], path: str) -> set[int]:
    ids = set(config_eos)
    gen_cfg = os.path.join(path, "generation_config.json") if os.path.isdir(path) else None
    if gen_cfg and os.path.exists(gen_cfg):
        with open(gen_cfg) as f:
            e = json.load(f).get("eos_token_id")
        if e is not None:
            ids |= {e} if isinstance(e, int) else set(e)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class IncrementalDetokenizer:
    """Text of a growing list of token ids, emitted as deltas; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""

    def update(self, output_ids: list[int]) -> str:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return delta
