"""Long prefills run attention in query chunks (bounded score memory) and compute what one call computes."""
import pytest
import torch

from lowbit import LLM
from lowbit.layers import attention


@pytest.mark.parametrize("variant", ["deepseek_v3", "llama"])
def test_chunked_prefill_equals_whole(tiny_checkpoints, monkeypatch, variant):
    path, _ = tiny_checkpoints[variant]
    ids = torch.randint(0, 320, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = LLM(path, device="cpu")
    whole = llm.logits(ids)
    heads = llm.engine.model_config.num_attention_heads
    monkeypatch.setattr(attention, "PREFILL_SCORE_ELEMENTS", heads * 90 * 7)  # chunks of 7 queries
    chunked = llm.logits(ids)
    assert (chunked - whole).abs().max().item() < 1e-4
