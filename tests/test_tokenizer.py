"""The incremental detokenizer: streamed deltas add up to the full decode, step by step, while each step decodes a
window of a few ids, not the whole output (a byte-level BPE tokenizer, the default model's, and a SentencePiece-style
one that drops the leading space at the start of a decode)."""
from __future__ import annotations

import random

import pytest

from lowbit.tokenizer import IncrementalDetokenizer

TEXTS = ["The capital of France is Paris. It has 2,140,526 inhabitants (2019).",
         "Naïve café — 東京タワー 🗼🚀 emojis, \u00e9t\u00e9 and a   triple space.\n\nNew paragraph:\tdone."]


class Spy:
    """A tokenizer (and its Rust backend, which the detokenizer calls where it can) whose decode records how many ids
    it was given."""

    def __init__(self, tok, lengths=None):
        self.tok, self.lengths = tok, [] if lengths is None else lengths
        self.clean_up_tokenization_spaces = getattr(tok, "clean_up_tokenization_spaces", True)
        if getattr(tok, "_tokenizer", None) is not None:
            self._tokenizer = Spy(tok._tokenizer, self.lengths)

    def decode(self, ids, **kw):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)


def stream(tok, ids):
    spy = Spy(tok)
    detok, out = IncrementalDetokenizer(spy), ""
    for k in range(1, len(ids) + 1):
        out += detok.update(ids[:k])
        full = tok.decode(ids[:k], skip_special_tokens=True)
        assert full.startswith(out), (k, out, full)  # never ahead of, never different from, the full decode
        assert detok.text == out
    return out, spy.lengths


@pytest.fixture(scope="module")
def bpe():
    from lowbit.default_model import default_model_path
    from lowbit.tokenizer import load_tokenizer
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A small BPE over Metaspace ('▁' for spaces, the leading one dropped when decoding), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"] + alphabet)
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece_like"])
def test_streamed_text_equals_the_full_decode(kind, request):
    tok = request.getfixturevalue(kind)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        out, _ = stream(tok, ids)
        assert out == tok.decode(ids, skip_special_tokens=True)


def test_random_ids_and_special_tokens_stream_to_the_full_decode(bpe):
    rng = random.Random(0)
    ids = [rng.randrange(bpe.vocab_size) for _ in range(200)]
    ids[50:50] = [bpe.eos_token_id] * 3  # skipped, mid-stream
    out, _ = stream(bpe, ids)
    assert out == bpe.decode(ids, skip_special_tokens=True)


def test_each_step_decodes_a_window_not_the_whole_output(bpe):
    ids = bpe.encode(" ".join(TEXTS * 12), add_special_tokens=False)
    assert len(ids) > 400
    _, lengths = stream(bpe, ids)
    assert max(lengths) <= 16, max(lengths)  # the whole output each step would reach len(ids)
