"""DeepSeek-V2 / V3 / R1 (and Kimi-K2, Moonlight): MLA attention, grouped top-k MoE with shared experts, and the
multi-token-prediction (MTP) layer. Blocks are named after the papers: MLA, Gate, MoE, Block, MTPLayer."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.engine import parallel
from lowbit.layers.attention import MLAAttention
from lowbit.layers.block import PreNormBlock
from lowbit.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from lowbit.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, fuse_same_input
from lowbit.layers.mlp import GatedMLP
from lowbit.layers.moe import Experts, gate_logits, select_experts
from lowbit.layers.norm import RMSNorm
from lowbit.layers.rotary import RotaryEmbedding, yarn_get_mscale


def make_rotary(cfg: ModelConfig) -> RotaryEmbedding:
    return RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, interleaved=cfg.rope_interleave)


class MLA(nn.Module):
    """Multi-head latent attention. Keys and values are stored as one compressed latent c_kv [kv_lora_rank] plus a
    shared rope key [qk_rope_head_dim] per token; queries are absorbed through kv_b_proj's key half, and the
    attention output through its value half, so the cache is never expanded per head."""

    def __init__(self, cfg: ModelConfig, quant_config, prefix: str, dtype, rotary: RotaryEmbedding | None = None):
        super().__init__()
        tp = parallel.tp_size()
        self.num_heads = cfg.num_attention_heads // tp
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_head_dim = cfg.qk_head_dim
        qm = quant_config.linear_method
        H = cfg.num_attention_heads
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, H * qk_head_dim, quant_method=qm(f"{prefix}.q_proj"),
                                               params_dtype=dtype, prefix=f"{prefix}.q_proj")
        else:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, self.q_lora_rank, bias=cfg.attention_bias,
                                             quant_method=qm(f"{prefix}.q_a_proj"), params_dtype=dtype,
                                             prefix=f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, H * qk_head_dim,
                                                 quant_method=qm(f"{prefix}.q_b_proj"), params_dtype=dtype,
                                                 prefix=f"{prefix}.q_b_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, self.kv_lora_rank + self.rope_dim,
                                                   bias=cfg.attention_bias,
                                                   quant_method=qm(f"{prefix}.kv_a_proj_with_mqa"),
                                                   params_dtype=dtype, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim),
                                              quant_method=qm(f"{prefix}.kv_b_proj"), params_dtype=dtype,
                                              prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(H * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias,
                                        quant_method=qm(f"{prefix}.o_proj"), params_dtype=dtype,
                                        prefix=f"{prefix}.o_proj")
        self.rotary = rotary or make_rotary(cfg)  # shared by the model's layers: cos/sin once per step
        scale = qk_head_dim ** -0.5
        rs = cfg.rope_scaling or {}
        if rs.get("rope_type") == "yarn" and rs.get("mscale_all_dim"):
            scale *= yarn_get_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
        self.attn = MLAAttention(self.num_heads, self.kv_lora_rank, self.rope_dim, scale)
        self.register_buffer("w_uk", torch.empty(0), persistent=False)  # [H, nope, r], set after loading
        self.register_buffer("w_uv", torch.empty(0), persistent=False)  # [H, v, r]
        self._q_kv_a = None  # the first q projection and kv_a_proj_with_mqa in one product, where kernels allow

    def process_weights_after_loading(self) -> None:
        w = self.kv_b_proj.quant_method.dequantized_weight(self.kv_b_proj)  # [H*(nope+v), r]
        w = w.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        dtype = self.kv_a_layernorm.weight.dtype
        self.w_uk = w[:, :self.nope_dim].to(dtype).contiguous()
        self.w_uv = w[:, self.nope_dim:].to(dtype).contiguous()
        # q_proj (q_a_proj with q LoRA) and kv_a_proj_with_mqa read the same input: one launch where kernels allow
        # (q_proj is split under tensor parallel, q_a_proj is not)
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        self._q_kv_a = fuse_same_input([first, self.kv_a_proj_with_mqa])

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if self._q_kv_a is not None:
            q, kv_a = self._q_kv_a(x)
        else:
            q = (self.q_proj if self.q_lora_rank is None else self.q_a_proj)(x)
            kv_a = self.kv_a_proj_with_mqa(x)  # [T, r + rope]
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(T, self.num_heads, self.nope_dim + self.rope_dim)
        if self.attn.decodes_fused():  # the same math in the decode kernels' launches
            return self.o_proj(self.attn.decode_absorbed(positions, q, kv_a, self.kv_a_layernorm, self.rotary,
                                                         self.w_uk, self.w_uv))  # [T, H * v] -> [T, D]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # [T, H, nope], [T, H, rope]
        kv_latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_latent = self.kv_a_layernorm(kv_latent)  # [T, r]
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :])  # k_pe [T, 1, rope]
        if self.attn.prefills_expanded(self.nope_dim + self.rope_dim):  # a GPU prefill: keys and values expanded per head, SDPA's fused kernels
            o = self.attn.prefill_expanded(q_nope, q_pe, kv_latent, k_pe[:, 0], self.w_uk, self.w_uv)  # [T, H, v]
            return self.o_proj(o.reshape(T, self.num_heads * self.v_dim))
        q_latent = torch.einsum("thd,hdr->thr", q_nope, self.w_uk)  # [T, H, r]
        o_latent = self.attn(q_latent, q_pe, kv_latent, k_pe[:, 0])  # [T, H, r]
        o = torch.einsum("thr,hvr->thv", o_latent, self.w_uv)  # [T, H, v]
        return self.o_proj(o.reshape(T, self.num_heads * self.v_dim))


class Gate(nn.Module):
    """The MoE router: softmax or sigmoid scores, optional correction bias (noaux_tc), group-limited top-k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] float32, expert ids [T, K]); shared > 0 appends that many slots of weight 1
        for the shared experts, numbered after the routed ones."""
        logits = gate_logits(x, self.weight)  # [T, E] float32
        grouped = self.n_group > 1 and self.topk_method in ("group_limited_greedy", "noaux_tc")
        return select_experts(logits, self.top_k, self.n_group if grouped else 1, self.topk_group,
                              self.scoring_func == "sigmoid", self.e_score_correction_bias,
                              self.norm_topk_prob and self.top_k > 1, self.routed_scaling_factor, shared)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, quant_config, prefix: str, dtype):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, quant_config,
                               f"{prefix}.experts", dtype)
        self.shared_experts = (GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                        quant_config, f"{prefix}.shared_experts", dtype)
                               if cfg.n_shared_experts else None)
        if self.shared_experts is not None:
            self.experts.fuse_shared(self.shared_experts, cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.experts.num_shared  # the shared experts run inside the fused MoE
        weights, ids = self.gate(x, fused)
        y = self.experts(x, ids, weights)
        if self.shared_experts is not None and not fused:
            y = y + self.shared_experts(x)
        return y


class Block(PreNormBlock):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant_config, prefix: str, dtype,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.self_attn = MLA(cfg, quant_config, f"{prefix}.self_attn", dtype, rotary)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg, quant_config, f"{prefix}.mlp", dtype)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, quant_config, f"{prefix}.mlp", dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)


class MTPLayer(Block):
    """DeepSeek-V3's multi-token-prediction module (checkpoint layer index num_hidden_layers + i): predicts token
    t+2 from the main model's last hidden state at t and the embedding of token t+1."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, quant_config, prefix: str, dtype):
        super().__init__(cfg, layer_idx, quant_config, prefix, dtype)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size,
                                        quant_method=quant_config.linear_method(f"{prefix}.eh_proj"),
                                        params_dtype=dtype, prefix=f"{prefix}.eh_proj")
        self.shared_head = SharedHead(cfg, dtype)

    def forward(self, positions: torch.Tensor, next_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """next_ids [T], the main model's final hidden states [T, D] -> this layer's logits [T, V]."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1))
        x, residual = super().forward(positions, x)
        return self.shared_head.head(self.shared_head.norm(x, residual)[0])


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant_config, dtype, num_mtp_layers: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        rotary = make_rotary(cfg)
        self.layers = nn.ModuleList(Block(cfg, i, quant_config, f"model.layers.{i}", dtype, rotary)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, n + i, quant_config, f"model.layers.{n + i}", dtype)
                                 for i in range(num_mtp_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, D]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class DeepseekForCausalLM(nn.Module):
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig, quant_config, dtype: torch.dtype, checkpoint_names=None):
        super().__init__()
        self.config = cfg
        # the MTP layer is built when the checkpoint carries it (transformers' save_pretrained drops it)
        n = cfg.num_hidden_layers
        num_mtp = 0
        if checkpoint_names is not None:
            while any(name.startswith(f"model.layers.{n + num_mtp}.") for name in checkpoint_names):
                num_mtp += 1
        self.model = DeepseekModel(cfg, quant_config, dtype, num_mtp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def skips_checkpoint_tensor(self, name: str) -> bool:
        """Routed experts that live on other expert-parallel ranks (their tensors are never read here)."""
        parts = name.split(".")
        if len(parts) > 5 and parts[3] == "mlp" and parts[4] == "experts":
            block = self.get_submodule(".".join(self.checkpoint_to_param_name(name).split(".")[:3]))
            return not block.mlp.experts.owns(int(parts[5]))
        return False

    def checkpoint_to_param_name(self, name: str) -> str:
        """Checkpoint layers past num_hidden_layers are the MTP layers: model.layers.{n+i}.X -> model.mtp.{i}.X."""
        if name.startswith("model.layers."):
            idx = int(name.split(".", 3)[2])
            n = self.config.num_hidden_layers
            if idx >= n:
                return f"model.mtp.{idx - n}." + name.split(".", 3)[3]
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
