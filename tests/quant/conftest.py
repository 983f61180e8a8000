"""Tiny random checkpoints for quantization tests: a DeepSeek-V3 (MLA, MoE, an MTP layer) wide enough for 128-wide
groups and FP8 blocks, and a llama; each with a byte-level tokenizer so that calibration text can be encoded."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEEPSEEK = dict(vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                n_group=2, topk_group=1, n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2,
                q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                max_position_embeddings=1024, initializer_range=0.05, routed_scaling_factor=1.0,
                num_nextn_predict_layers=1)
LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.05, tie_word_embeddings=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def save_byte_tokenizer(path) -> None:
    """A byte-level tokenizer whose 256 tokens are the 256 bytes (ids = byte values)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[i]: i for i in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=b2u[1], eos_token=b2u[2]).save_pretrained(str(path))


def add_mtp_layer(path, cfg: dict, seed: int = 1) -> None:
    """DeepSeek's MTP layer (checkpoint layer num_hidden_layers), which save_pretrained does not write: a MoE block
    plus embed_tokens, enorm, hnorm, eh_proj and shared_head, in a shard of its own."""
    n = cfg["num_hidden_layers"]
    src = load_file(os.path.join(path, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    mtp = {}
    for name, t in src.items():
        if name.startswith(f"model.layers.{n - 1}."):
            new = name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")
            mtp[new] = t + 0.02 * torch.randn(t.shape, generator=g) if t.ndim == 2 else t.clone()
    h = cfg["hidden_size"]
    mtp.update({f"model.layers.{n}.embed_tokens.weight": src["model.embed_tokens.weight"].clone(),
                f"model.layers.{n}.enorm.weight": torch.ones(h), f"model.layers.{n}.hnorm.weight": torch.ones(h),
                f"model.layers.{n}.eh_proj.weight": 0.05 * torch.randn(h, 2 * h, generator=g),
                f"model.layers.{n}.shared_head.norm.weight": torch.ones(h),
                f"model.layers.{n}.shared_head.head.weight": src["lm_head.weight"].clone()})
    save_file(mtp, os.path.join(path, "model-mtp.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model.safetensors" for k in src} | {k: "model-mtp.safetensors" for k in mtp}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make_deepseek(path, seed: int = 0, mtp: bool = True, **overrides):
    import transformers
    cfg = dict(DEEPSEEK, **overrides)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    model.save_pretrained(str(path))
    save_byte_tokenizer(path)
    if mtp:
        add_mtp_layer(str(path), cfg)
    return str(path)


def make_llama(path, seed: int = 0, **overrides):
    import transformers
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(LLAMA, **overrides))).eval()
    model.save_pretrained(str(path))
    save_byte_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory):
    return make_deepseek(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama"))
