"""Every tensor a checkpoint of a given config holds: name, shape, what kind of module it belongs to and how lowbit's
layers shard it. Pure arithmetic on the config; the names are the checkpoint's, so a recipe can be asked about them.

DeepSeek's MTP layers are checkpoint layers num_hidden_layers .. num_hidden_layers + num_nextn_predict_layers - 1,
each a full decoder block plus its own embedding, enorm/hnorm, eh_proj and shared head (as DeepSeek ships them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.config import ModelConfig

# module kinds, in the order reports list them
KINDS = ("embedding", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norm", "lm_head",
         "mtp_proj")

# how lowbit's layers place a tensor across the GPUs of one pipeline stage
TP = "tp"                  # split across tensor-parallel ranks (column/row-parallel linears, vocab-parallel tables)
REPLICATED = "replicated"  # whole on every rank (norms, router, q_a/kv_a projections)
EXPERT = "expert"          # one routed expert: split by tp, or placed whole on one expert-parallel rank


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str  # checkpoint name: model.layers.3.mlp.experts.7.down_proj.weight
    shape: tuple[int, ...]
    kind: str  # one of KINDS
    shard: str  # TP | REPLICATED | EXPERT
    layer: int | None  # decoder layer (MTP layers come after the main ones); None: embedding, final norm, lm_head
    linear: bool = False  # the weight of a linear layer: a recipe may quantize it
    mtp: bool = False
    dtype_bytes: int = 2  # when left unquantized: bf16, except fp32 router correction biases

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def _linear(prefix: str, out_f: int, in_f: int, kind: str, shard: str, layer: int | None, mtp: bool,
            bias: bool = False) -> list[Tensor]:
    ts = [Tensor(f"{prefix}.weight", (out_f, in_f), kind, shard, layer, linear=True, mtp=mtp)]
    if bias:
        ts.append(Tensor(f"{prefix}.bias", (out_f,), kind, shard, layer, mtp=mtp))
    return ts


def _norm(name: str, dim: int, layer: int | None, mtp: bool) -> Tensor:
    return Tensor(f"{name}.weight", (dim,), "norm", REPLICATED, layer, mtp=mtp)


def _gated_mlp(prefix: str, hidden: int, inter: int, kind: str, shard: str, layer: int, mtp: bool) -> list[Tensor]:
    return (_linear(f"{prefix}.gate_proj", inter, hidden, kind, shard, layer, mtp)
            + _linear(f"{prefix}.up_proj", inter, hidden, kind, shard, layer, mtp)
            + _linear(f"{prefix}.down_proj", hidden, inter, kind, shard, layer, mtp))


def _mla(cfg: ModelConfig, p: str, i: int, mtp: bool) -> list[Tensor]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    ts: list[Tensor] = []
    if cfg.q_lora_rank is None:
        ts += _linear(f"{p}.q_proj", H * cfg.qk_head_dim, D, "attention", TP, i, mtp)
    else:
        ts += _linear(f"{p}.q_a_proj", cfg.q_lora_rank, D, "attention", REPLICATED, i, mtp, cfg.attention_bias)
        ts.append(_norm(f"{p}.q_a_layernorm", cfg.q_lora_rank, i, mtp))
        ts += _linear(f"{p}.q_b_proj", H * cfg.qk_head_dim, cfg.q_lora_rank, "attention", TP, i, mtp)
    ts += _linear(f"{p}.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, D, "attention", REPLICATED, i,
                  mtp, cfg.attention_bias)
    ts.append(_norm(f"{p}.kv_a_layernorm", cfg.kv_lora_rank, i, mtp))
    ts += _linear(f"{p}.kv_b_proj", H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, "attention", TP,
                  i, mtp)
    ts += _linear(f"{p}.o_proj", D, H * cfg.v_head_dim, "attention", TP, i, mtp, cfg.attention_bias)
    return ts


def _gqa(cfg: ModelConfig, p: str, i: int) -> list[Tensor]:
    D, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    ts = (_linear(f"{p}.q_proj", q, D, "attention", TP, i, False, cfg.attention_bias)
          + _linear(f"{p}.k_proj", kv, D, "attention", TP, i, False, cfg.attention_bias)
          + _linear(f"{p}.v_proj", kv, D, "attention", TP, i, False, cfg.attention_bias)
          + _linear(f"{p}.o_proj", D, q, "attention", TP, i, False))
    if cfg.qk_norm:
        ts += [_norm(f"{p}.q_norm", hd, i, False), _norm(f"{p}.k_norm", hd, i, False)]
    return ts


def _moe(cfg: ModelConfig, p: str, i: int, mtp: bool) -> list[Tensor]:
    D, E = cfg.hidden_size, cfg.n_routed_experts
    ts = [Tensor(f"{p}.gate.weight", (E, D), "router", REPLICATED, i, mtp=mtp)]
    if cfg.topk_method == "noaux_tc":
        ts.append(Tensor(f"{p}.gate.e_score_correction_bias", (E,), "router", REPLICATED, i, mtp=mtp, dtype_bytes=4))
    for e in range(E):
        ts += _gated_mlp(f"{p}.experts.{e}", D, cfg.moe_intermediate_size, "routed_experts", EXPERT, i, mtp)
    if cfg.n_shared_experts:
        ts += _gated_mlp(f"{p}.shared_experts", D, cfg.moe_intermediate_size * cfg.n_shared_experts,
                         "shared_experts", TP, i, mtp)
    return ts


def _block(cfg: ModelConfig, i: int, mtp: bool) -> list[Tensor]:
    p = f"model.layers.{i}"
    ts = _mla(cfg, f"{p}.self_attn", i, mtp) if cfg.is_deepseek else _gqa(cfg, f"{p}.self_attn", i)
    if cfg.is_moe_layer(i):
        ts += _moe(cfg, f"{p}.mlp", i, mtp)
    else:
        ts += _gated_mlp(f"{p}.mlp", cfg.hidden_size, cfg.intermediate_size, "dense_mlp", TP, i, mtp)
    ts += [_norm(f"{p}.input_layernorm", cfg.hidden_size, i, mtp),
           _norm(f"{p}.post_attention_layernorm", cfg.hidden_size, i, mtp)]
    return ts


def _mtp_extras(cfg: ModelConfig, i: int) -> list[Tensor]:
    p, D, V = f"model.layers.{i}", cfg.hidden_size, cfg.vocab_size
    return [Tensor(f"{p}.embed_tokens.weight", (V, D), "embedding", TP, i, mtp=True),
            _norm(f"{p}.enorm", D, i, True), _norm(f"{p}.hnorm", D, i, True),
            *_linear(f"{p}.eh_proj", D, 2 * D, "mtp_proj", REPLICATED, i, True),
            _norm(f"{p}.shared_head.norm", D, i, True),
            # the MTP layer's output head: lm_head's twin, so it follows lm_head in the recipe (see plan.memory)
            Tensor(f"{p}.shared_head.head.weight", (V, D), "lm_head", TP, i, linear=True, mtp=True)]


def model_tensors(cfg: ModelConfig, include_mtp: bool = True) -> list[Tensor]:
    """Every tensor of the checkpoint, main model first, then the MTP layers when `include_mtp`."""
    D, V = cfg.hidden_size, cfg.vocab_size
    ts = [Tensor("model.embed_tokens.weight", (V, D), "embedding", TP, None)]
    for i in range(cfg.num_hidden_layers):
        ts += _block(cfg, i, mtp=False)
    ts.append(_norm("model.norm", D, None, False))
    if not cfg.tie_word_embeddings:
        ts.append(Tensor("lm_head.weight", (V, D), "lm_head", TP, None, linear=True))
    if include_mtp and cfg.is_deepseek:
        n = cfg.num_hidden_layers
        for i in range(n, n + cfg.num_nextn_predict_layers):
            ts += _block(cfg, i, mtp=True) + _mtp_extras(cfg, i)
    return ts


def param_counts(tensors: list[Tensor]) -> dict[str, dict[str, int]]:
    """{"main": {kind: params}, "mtp": {kind: params}}, kinds in KINDS order, zero kinds left out."""
    out: dict[str, dict[str, int]] = {"main": {}, "mtp": {}}
    for t in tensors:
        part = out["mtp" if t.mtp else "main"]
        part[t.kind] = part.get(t.kind, 0) + t.numel
    return {k: {kind: v[kind] for kind in KINDS if kind in v} for k, v in out.items()}
