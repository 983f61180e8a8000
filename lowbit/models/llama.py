"""Llama, Qwen2 and Qwen3: grouped-query attention, gated MLP, RMSNorm; Qwen3 adds per-head q/k norms."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.engine import parallel
from lowbit.layers.attention import Attention
from lowbit.layers.block import PreNormBlock
from lowbit.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from lowbit.layers.linear import QKVParallelLinear, RowParallelLinear
from lowbit.layers.mlp import GatedMLP
from lowbit.layers.norm import RMSNorm
from lowbit.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, quant_config, prefix: str, dtype, rotary: RotaryEmbedding):
        super().__init__()
        tp = parallel.tp_size()
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = cfg.num_key_value_heads // tp
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=cfg.attention_bias,
                                          quant_method=quant_config.linear_method(f"{prefix}.qkv_proj"),
                                          params_dtype=dtype, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                        quant_method=quant_config.linear_method(f"{prefix}.o_proj"),
                                        params_dtype=dtype, prefix=f"{prefix}.o_proj")
        self.rotary = rotary  # shared by every layer: cos/sin computed once per step
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(self.num_heads, cfg.head_dim, self.num_kv_heads, cfg.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v)  # [T, H, D]
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaBlock(PreNormBlock):
    def __init__(self, cfg: ModelConfig, quant_config, prefix: str, dtype, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, quant_config, f"{prefix}.self_attn", dtype, rotary)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, quant_config, f"{prefix}.mlp", dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant_config, dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaBlock(cfg, quant_config, f"model.layers.{i}", dtype, rotary)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, D]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (this model's merged module, shard)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, quant_config, dtype: torch.dtype, checkpoint_names=None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, quant_config, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
