"""Attention over the paged KV cache.

The model files carry no batching metadata: the ModelRunner sets a forward `Context` (which tokens belong to which
sequence, where their keys go in the cache, each sequence's block table) and attention reads it from here, as in
nano-vllm. The torch path below is the CPU path and the reference the GPU kernels are tested against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Context:
    is_prefill: bool = False
    slot_mapping: torch.Tensor | None = None  # [T] flat cache slot of each new token
    block_tables: torch.Tensor | None = None  # [B, max_blocks] (padded with 0)
    context_lens: torch.Tensor | None = None  # [B] tokens in the cache after this step
    query_lens: list[int] = field(default_factory=list)  # prefill: new tokens of each sequence
    context_lens_list: list[int] = field(default_factory=list)
    block_size: int = 16
    decode_mask: torch.Tensor | None = None  # [B, L] valid cached positions, built by the first layer of a step


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    set_context(Context())


def prefill_context(seq_lens: list[int], block_size: int, device) -> tuple[Context, int]:
    """A context for running whole sequences through attention outside the engine (calibration, scoring): the
    sequences are laid out one after another in a cache of the returned number of blocks, which the caller binds."""
    tables, slots, next_block = [], [], 0
    for n in seq_lens:
        nb = -(-n // block_size)
        tables.append(list(range(next_block, next_block + nb)))
        slots.append(torch.arange(n) + next_block * block_size)
        next_block += nb
    width = max(len(t) for t in tables)
    ctx = Context(is_prefill=True, slot_mapping=torch.cat(slots).to(device),
                  block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
                  context_lens=torch.tensor(seq_lens, device=device), query_lens=list(seq_lens),
                  context_lens_list=list(seq_lens), block_size=block_size)
    return ctx, next_block


# Scores one prefill attention call may hold (2^27: 512 MiB in float32): where SDPA has no fused kernel (MLA's
# 576-wide absorbed heads on a GPU, every case on the CPU) it materializes heads x queries x keys, so longer prompts
# run in query chunks.
PREFILL_SCORE_ELEMENTS = 1 << 27
# MLA prefill on the GPU with each head's keys and values expanded from the latent (MLAAttention.prefill_expanded);
# LOWBIT_MLA_PREFILL=absorbed keeps the absorbed form of the CPU path
def _mla_prefill_form(text: str) -> bool:
    if text not in ("expanded", "absorbed"):
        raise ValueError(f"LOWBIT_MLA_PREFILL={text!r}: expanded (the default) or absorbed")
    return text == "expanded"


EXPANDED_PREFILL = _mla_prefill_form(os.environ.get("LOWBIT_MLA_PREFILL", "expanded"))
EXPANDED_PREFILL_BYTES = 1 << 31  # one sequence's expanded keys and values at most (R1, 128 heads: 21,845 tokens)


def gather_slots(block_table: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(n, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size  # [n]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: Context,
                    scale: float) -> torch.Tensor:
    """q [T, H, Dk] against every cached key of its sequence (the new ones already stored) -> [T, H, Dv].

    k_cache [N, block, Hkv, Dk], v_cache [N, block, Hkv, Dv]; Hkv divides H (grouped-query attention).
    """
    H = q.shape[1]
    Hkv = k_cache.shape[2]
    gqa = H != Hkv
    if not ctx.is_prefill:
        B, nb = ctx.block_tables.shape
        blocks = ctx.block_tables.flatten()
        # index_select, not k_cache[block_tables]: advanced indexing takes a slow path on the CPU
        k = k_cache.index_select(0, blocks).view(B, nb * k_cache.shape[1], Hkv, -1)  # [B, L, Hkv, Dk]
        v = v_cache.index_select(0, blocks).view(B, nb * v_cache.shape[1], Hkv, -1)  # [B, L, Hkv, Dv]
        L = k.shape[1]
        mask = ctx.decode_mask
        if mask is None or mask.shape[1] != L:
            mask = torch.arange(L, device=q.device)[None, :] < ctx.context_lens[:, None]  # [B, L]
            ctx.decode_mask = mask  # the same for every layer of this step
        # grouped-query decode: each kv head's G query heads become G query rows against the same keys.
        # Plain matmuls: for one query row the CPU's fused SDPA kernel costs milliseconds of set-up.
        scores = torch.matmul(q.view(B, Hkv, H // Hkv, -1), k.permute(0, 2, 3, 1)) * scale  # [B, Hkv, G, L]
        scores = scores.float().masked_fill_(~mask[:, None, None, :], float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v.transpose(1, 2))  # [B, Hkv, G, Dv]
        return out.reshape(B, H, -1)
    outs = []
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    start = 0
    for i, (qlen, clen) in enumerate(zip(ctx.query_lens, ctx.context_lens_list, strict=True)):
        qi = q[start:start + qlen].transpose(0, 1)  # [H, qlen, Dk]
        slots = gather_slots(ctx.block_tables[i], clen, ctx.block_size)
        ki = k_flat.index_select(0, slots).transpose(0, 1)  # [Hkv, clen, Dk]
        vi = v_flat.index_select(0, slots).transpose(0, 1)  # [Hkv, clen, Dv]
        chunk = max(1, PREFILL_SCORE_ELEMENTS // (H * clen))
        if qlen == clen and qlen <= chunk:
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa)
        else:  # a cached prefix (resumed or chunked), or a long prompt: query t sits at position clen - qlen + t
            parts = []
            for c0 in range(0, qlen, chunk):
                qpos = torch.arange(clen - qlen + c0, clen - qlen + min(c0 + chunk, qlen), device=q.device)
                n = int(qpos[-1]) + 1  # keys past the chunk's last query are masked anyway: not read
                mask = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
                parts.append(F.scaled_dot_product_attention(qi[:, c0:c0 + chunk], ki[:, :n], vi[:, :n],
                                                            attn_mask=mask, scale=scale, enable_gqa=gqa))
            oi = torch.cat(parts, dim=1)
        outs.append(oi.transpose(0, 1))
        start += qlen
    return torch.cat(outs, dim=0)


def store_kv(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache [N, block, ...] <- x [T, ...] at the flat slots."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, x.to(cache.dtype))


class Attention(nn.Module):
    """Grouped-query attention over a paged cache; the runner assigns `k_cache` / `v_cache`."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        self.k_cache = self.v_cache = torch.tensor([])

    def cache_shape(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        return [(num_blocks, block_size, self.num_kv_heads, self.head_dim)] * 2

    def bind_cache(self, caches: list[torch.Tensor]) -> None:
        from lowbit.kernels.linear import kernels_enabled
        self.k_cache, self.v_cache = caches
        # the Triton paged decode (query heads per kv head in one 16-row tile)
        self.decode_kernel = kernels_enabled(self.k_cache.device) and self.num_heads // self.num_kv_heads <= 16

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        ctx = get_context()
        store_kv(self.k_cache, k, ctx.slot_mapping)
        store_kv(self.v_cache, v, ctx.slot_mapping)
        if not ctx.is_prefill and getattr(self, "decode_kernel", False):
            from lowbit.kernels.gqa_decode import gqa_decode
            return gqa_decode(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale)
        return paged_attention(q, self.k_cache, self.v_cache, ctx, self.scale)


class MLAAttention(nn.Module):
    """Multi-head latent attention in the absorbed form: the cache holds only the compressed latent and the rope
    key of each token, [N, block, kv_lora_rank + qk_rope_head_dim], read by all heads at once."""

    def __init__(self, num_heads: int, kv_lora_rank: int, qk_rope_head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.kv_lora_rank, self.rope_dim, self.scale = num_heads, kv_lora_rank, qk_rope_head_dim, scale
        self.kv_cache = torch.tensor([])

    def cache_shape(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        return [(num_blocks, block_size, 1, self.kv_lora_rank + self.rope_dim)]

    def bind_cache(self, caches: list[torch.Tensor]) -> None:
        from lowbit.kernels.linear import kernels_enabled
        (self.kv_cache,) = caches
        self.decode_kernel = kernels_enabled(self.kv_cache.device)  # the Triton paged MLA decode

    def decodes_fused(self) -> bool:
        """A decode step on the kernel path: the caller attends through `decode_absorbed`, not `forward`."""
        return getattr(self, "decode_kernel", False) and not get_context().is_prefill

    def decode_absorbed(self, positions: torch.Tensor, q: torch.Tensor, kv_a: torch.Tensor, kv_norm: nn.Module,
                        rotary: nn.Module, w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        """A decode step in four launches: q [T, H, nope + dr] and kv_a_proj_with_mqa's output kv_a [T, r + dr] ->
        o_proj's input [T, H * v]. The latent's RMSNorm (kv_norm), the rope key's rotation and the cache store, and
        beside them the absorbed query (q_nope W_UK | rotated q_pe), are one launch; then the paged MLA decode, its
        splits' merge and the W_UV product (kernels/mla_prep.py, mla_decode.py)."""
        from lowbit.kernels.mla_decode import mla_decode
        from lowbit.kernels.mla_prep import mla_out, mla_prep
        ctx = get_context()
        cos, sin = rotary.cached_cos_sin(positions, q.dtype)  # [T, dr/2]
        # the cache row (latent norm, rope key) and the absorbed query, one launch
        q = mla_prep(kv_a, kv_norm.weight, kv_norm.eps, cos, sin, rotary.interleaved, self.kv_cache,
                     ctx.slot_mapping, q, w_uk)  # [T, H, r + dr]
        o_latent = mla_decode(q, self.kv_cache, ctx.block_tables, ctx.context_lens, self.scale, self.kv_lora_rank)
        return mla_out(o_latent, w_uv)  # [T, H * v]

    def prefills_expanded(self, head_dim: int) -> bool:
        """A prefill on the GPU whose longest sequence's expanded keys and values (heads x context x head_dim, each)
        fit EXPANDED_PREFILL_BYTES: the caller attends through `prefill_expanded` (LOWBIT_MLA_PREFILL=absorbed: never;
        longer contexts keep the absorbed form, whose scores go in query chunks)."""
        ctx = get_context()
        if not (getattr(self, "decode_kernel", False) and ctx.is_prefill and EXPANDED_PREFILL):
            return False
        longest = max(ctx.context_lens_list, default=0)
        return 2 * self.num_heads * longest * head_dim * self.kv_cache.element_size() <= EXPANDED_PREFILL_BYTES

    def prefill_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_latent: torch.Tensor, k_pe: torch.Tensor,
                         w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        """A prefill with each head's keys and values expanded from the latent (as the model was trained, and as
        Hugging Face's DeepSeek attends): q_nope [T, H, nope], q_pe [T, H, dr] (rotated), kv_latent [T, r] (normed),
        k_pe [T, dr] (rotated) -> [T, H, v]. The latent and rope key are cached as `forward` caches them; each
        sequence's cached latent (its new tokens and any cached prefix) is expanded through W_UK and W_UV into
        [H, L, nope + dr] keys and [H, L, v] values, and SDPA takes them with the queries [H, T_i, nope + dr] at
        head width nope + dr (192 for DeepSeek), where its fused kernels run in 16 bits; the absorbed form's
        576-wide heads have no fused kernel and ran in float32 (H100, 2026-11-25, profile-offline-...: 200 of 640 ms
        of a 4-layer V2-Lite prefill of 256 x 512 tokens in float32 GEMMs). The values are zero-padded to the key
        width where it differs (one head width for every fused kernel)."""
        ctx = get_context()
        r = self.kv_lora_rank
        store_kv(self.kv_cache, torch.cat([kv_latent, k_pe], dim=-1)[:, None, :], ctx.slot_mapping)
        flat = self.kv_cache.flatten(0, 1)[:, 0]  # [slots, r + dr]
        H, nope, vd = w_uk.shape[0], w_uk.shape[1], w_uv.shape[1]
        dk = nope + k_pe.shape[-1]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, dk]
        outs, start = [], 0
        for i, (qlen, clen) in enumerate(zip(ctx.query_lens, ctx.context_lens_list, strict=True)):
            cached = flat.index_select(0, gather_slots(ctx.block_tables[i], clen, ctx.block_size))  # [L, r + dr]
            lat, pe = cached[:, :r], cached[:, r:]
            k = torch.cat([torch.einsum("lr,hdr->hld", lat, w_uk), pe[None].expand(H, clen, -1)], dim=-1)
            v = torch.einsum("lr,hvr->hlv", lat, w_uv)  # [H, L, v]
            if vd < dk:
                v = F.pad(v, (0, dk - vd))
            qi = q[start:start + qlen].transpose(0, 1)  # [H, qlen, dk]
            if qlen == clen:
                oi = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=self.scale)
            else:  # a cached prefix: query t sits at position clen - qlen + t
                qpos = torch.arange(clen - qlen, clen, device=q.device)
                mask = torch.arange(clen, device=q.device)[None, :] <= qpos[:, None]
                oi = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=self.scale)
            outs.append(oi[..., :vd].transpose(0, 1))  # [qlen, H, v]
            start += qlen
        return torch.cat(outs, dim=0)

    def forward(self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_latent: torch.Tensor,
                k_pe: torch.Tensor) -> torch.Tensor:
        """q_latent [T, H, r] (q_nope absorbed through W_UK), q_pe [T, H, dr], kv_latent [T, r], k_pe [T, dr]
        -> the attention-weighted latent [T, H, r] (the caller applies W_UV)."""
        ctx = get_context()
        store_kv(self.kv_cache, torch.cat([kv_latent, k_pe], dim=-1)[:, None, :], ctx.slot_mapping)
        q = torch.cat([q_latent, q_pe], dim=-1)  # [T, H, r + dr]
        return paged_attention(q, self.kv_cache, self.kv_cache[..., :self.kv_lora_rank], ctx, self.scale)
