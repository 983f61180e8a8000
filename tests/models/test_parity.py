"""Logits parity with Hugging Face transformers, fp32 on the CPU."""
import pytest
import torch

from lowbit import LLM
from tests.conftest import VARIANTS


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_huggingface(tiny_checkpoints, variant):
    path, hf = tiny_checkpoints[variant]
    llm = LLM(path, device="cpu")
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = llm.logits(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape == (40, 320)
    assert (ours - ref).abs().max().item() <= 1e-3
    assert ref.std() > 0.1  # the oracle is not degenerate


def test_default_model_logits_match_huggingface(default_llm, default_hf):
    ids = default_llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of")
    ours = default_llm.logits(ids)
    with torch.no_grad():
        ref = default_hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3
