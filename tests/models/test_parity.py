"""Logits parity with Hugging Face transformers, fp32 on the CPU."""
import os

import pytest
import torch

import lowbit
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


def test_default_model_bf16_int4_close_to_float32(default_llm, default_llm_bf16):
    """bfloat16 runs the GGUF's Q4_1 weights as stored (torch's CPU int4 GEMM, bf16 activations); against the
    float32 path on the same dequantized weights, over 256 tokens of text: mean KL <= 5e-3 nats (measured 2.0e-3),
    top-1 agreement >= 93% (97.7%), max |logit difference| <= 2.5 (1.37)."""
    from lowbit.quant.gguf import Q4LinearMethod
    linears = [m for m in default_llm_bf16.engine.runner.model.modules() if hasattr(m, "quant_method")]
    assert len(linears) == 4 * 30 and all(isinstance(m.quant_method, Q4LinearMethod) and m._int4 is not None
                                          for m in linears)
    with open(os.path.join(os.path.dirname(lowbit.__file__), "data", "eval", "gpl-3.txt")) as f:
        ids = default_llm.tokenizer.encode(f.read(20000))[:256]
    fast, ref = default_llm_bf16.logits(ids), default_llm.logits(ids)
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(fast, -1)
    kl = (p.exp() * (p - q)).sum(-1)  # [T]
    assert kl.mean() <= 5e-3
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.93
    assert (fast - ref).abs().max() <= 2.5
