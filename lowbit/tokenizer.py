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
    """Text of a growing list of token ids, emitted as deltas; holds back an incomplete UTF-8 character.

    Each update decodes only a window: the ids after the last emitted character boundary (`read`), with the few ids
    before it (from `prefix`) as context, as vLLM and TGI do. Decoding the whole output every step cost O(n) per
    token, O(n^2) over a generation; the context ids make tokenizers that drop a leading space at the start of a
    decode (SentencePiece) give the same text as a full decode.
    """

    def __init__(self, tokenizer):
        self.text = ""
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of self.text
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's own (Rust) tokenizer
        if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                               True):
            # the same text without transformers' per-call wrapping (2 us a call instead of 9, twice per token)
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, output_ids: list[int]) -> str:
        if len(output_ids) <= self.read:
            return ""
        decode = self._decode
        before = decode(output_ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = decode(output_ids[self.prefix:])
        if text.endswith("\ufffd"):
            return ""  # half a character: wait for the next id
        if not text.startswith(before):
            # the context decodes differently once followed by more ids: fall back to decoding the output whole
            full = decode(output_ids)
            delta = full[len(self.text):] if full.startswith(self.text) else full
            self.text, self.prefix, self.read = full, max(0, len(output_ids) - 4), len(output_ids)
            return delta
        if len(text) == len(before):
            return ""  # nothing new yet (a special token, skipped)
        delta = text[len(before):]
        self.text += delta
        self.prefix, self.read = self.read, len(output_ids)
        return delta
