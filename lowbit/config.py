"""Validated configuration: ModelConfig (what the checkpoint is) and EngineConfig (how it is run)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "llama", "qwen2", "qwen3")
DEEPSEEK_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field and the file."""


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass(slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn"|"llama3"|"linear", ...}
    rope_interleave: bool = False  # DeepSeek rotates interleaved pairs (x0,x1),(x2,x3)...
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3's per-head q/k RMSNorm
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # MLA (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE (DeepSeek)
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    num_nextn_predict_layers: int = 0
    # the checkpoint's own quantization_config, as written (compressed-tensors, DeepSeek's fp8, ...)
    quantization_config: dict | None = None
    torch_dtype: str | None = None

    def __post_init__(self):
        _require(self.model_type in SUPPORTED_MODEL_TYPES, "model_type",
                 f"{self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        if self.is_deepseek:
            _require(self.kv_lora_rank > 0, "kv_lora_rank", "must be > 0 for DeepSeek MLA")
            _require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                     "must be a positive even number")
            _require(self.qk_nope_head_dim > 0 and self.v_head_dim > 0, "qk_nope_head_dim/v_head_dim",
                     "must be > 0")
            if self.n_routed_experts:
                _require(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                         f"must be in 1..n_routed_experts={self.n_routed_experts}")
                _require(self.n_routed_experts % self.n_group == 0, "n_group",
                         f"{self.n_group} does not divide n_routed_experts={self.n_routed_experts}")
                _require(0 < self.topk_group <= self.n_group, "topk_group", f"must be in 1..n_group={self.n_group}")
                _require(self.scoring_func in ("softmax", "sigmoid"), "scoring_func",
                         f"{self.scoring_func!r} is not softmax or sigmoid")
                _require(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
        else:
            _require(self.intermediate_size > 0, "intermediate_size", "must be > 0")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type")
            _require(rt in ("default", "yarn", "llama3", "linear"), "rope_scaling.rope_type",
                     f"{rt!r} is not supported (default, yarn, llama3, linear)")

    @property
    def is_deepseek(self) -> bool:
        return self.model_type in DEEPSEEK_TYPES

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.is_deepseek and self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        try:
            return cls._from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source}: missing or malformed field {e}") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type: {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        rtype = rope.get("rope_type") or rope.get("type") or "default"
        rope.pop("type", None)
        rope["rope_type"] = rtype
        rope_scaling = None if rtype == "default" else rope
        eos = d.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        n_heads = d["num_attention_heads"]
        kw: dict[str, Any] = dict(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size", 0), num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", mt == "qwen2")), hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos, quantization_config=d.get("quantization_config"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )
        if mt in DEEPSEEK_TYPES:
            kw.update(
                head_dim=d["qk_rope_head_dim"], q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
                qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
                v_head_dim=d["v_head_dim"], n_routed_experts=d.get("n_routed_experts") or 0,
                n_shared_experts=d.get("n_shared_experts") or 0, num_experts_per_tok=d.get("num_experts_per_tok") or 0,
                moe_intermediate_size=d.get("moe_intermediate_size") or 0,
                first_k_dense_replace=d.get("first_k_dense_replace", 0), moe_layer_freq=d.get("moe_layer_freq", 1),
                n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                num_nextn_predict_layers=d.get("num_nextn_predict_layers", 0) or 0,
                # DeepSeek's own checkpoints rotate interleaved pairs; transformers records it as rope_interleave
                rope_interleave=bool(d.get("rope_interleave", True)),
            )
            if mt == "deepseek_v3":
                kw.update(scoring_func=d.get("scoring_func", "sigmoid"), topk_method=d.get("topk_method", "noaux_tc"))
            else:
                kw.update(scoring_func=d.get("scoring_func", "softmax"), topk_method=d.get("topk_method", "greedy"))
        else:
            kw.update(head_dim=d.get("head_dim") or d["hidden_size"] // n_heads, qk_norm=mt == "qwen3")
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs a model: memory, batching and devices."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    enforce_eager: bool = False
    # a greedy CUDA-graph decode step is launched before the host has read the step before it (engine/cuda_graphs.py)
    async_decode: bool = True
    tensor_parallel_size: int = 1
    expert_parallel: bool = False  # routed experts partitioned across the torchrun world

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "tensor_parallel_size"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        _require(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "must be > 0")
        _require(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb", "must be > 0")


def resolve_model_path(model: str | None) -> str:
    """The default model's GGUF when `model` is None, else `model` checked to exist."""
    if model is None:
        from lowbit.default_model import default_model_path
        return default_model_path()
    if not os.path.exists(model):
        raise ConfigError(f"{model}: no such file or directory")
    return model
