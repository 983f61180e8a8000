"""Shared fixtures: tiny random checkpoints saved by Hugging Face transformers (the oracle), and the default model."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; set before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*non-writable.*")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist's workers (pyproject: one per core of the 2-core CI machine) share the cores: one torch thread
    # each, their subprocesses too, since oversubscribed threads ran ~10x slower there
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_DEEPSEEK = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32,
                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
                     initializer_range=0.1)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

VARIANTS = {
    # q LoRA, grouped sigmoid routing with a correction bias, YaRN
    "deepseek_v3": ("DeepseekV3", dict(TINY_DEEPSEEK, q_lora_rank=48, n_group=4, topk_group=2, norm_topk_prob=True,
                                       routed_scaling_factor=2.5, rope_scaling=YARN)),
    # no q LoRA, one group, no YaRN
    "deepseek_v3_noqlora": ("DeepseekV3", dict(TINY_DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1,
                                               norm_topk_prob=False, routed_scaling_factor=1.5)),
    # softmax scoring, group-limited greedy
    "deepseek_v2": ("DeepseekV2", dict(TINY_DEEPSEEK, q_lora_rank=None, n_group=2, topk_group=1,
                                       topk_method="group_limited_greedy", routed_scaling_factor=1.0)),
    "llama": ("Llama", dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            initializer_range=0.1, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3", dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                            initializer_range=0.1, tie_word_embeddings=True)),
}


def hf_classes(family: str):
    import transformers
    return getattr(transformers, f"{family}Config"), getattr(transformers, f"{family}ForCausalLM")


def make_checkpoint(path, variant: str, seed: int = 0):
    """Save a tiny random model of `variant` with save_pretrained; returns the Hugging Face model (the oracle)."""
    family, kw = VARIANTS[variant]
    config_cls, model_cls = hf_classes(family)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias") or "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """variant -> (path, Hugging Face model), built once per test session."""
    out = {}
    for variant in VARIANTS:
        p = tmp_path_factory.mktemp(variant)
        out[variant] = (str(p), make_checkpoint(p, variant))
    return out


@pytest.fixture(scope="session")
def default_llm():
    from lowbit import LLM
    return LLM(device="cpu")


@pytest.fixture(scope="session")
def default_llm_bf16():
    """The default model in bfloat16 on the CPU: its Q4_1 weights as stored, through torch's int4 GEMM."""
    from lowbit import LLM
    return LLM(device="cpu", dtype="bfloat16")


@pytest.fixture(scope="session")
def default_hf():
    """Hugging Face's own model from the same GGUF file (the oracle for the default model)."""
    from transformers import AutoModelForCausalLM
    from lowbit.default_model import default_model_path
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()
