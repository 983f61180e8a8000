"""Rotating the residual stream (QuaRot, Ashkboos et al., 2024): an orthogonal Q folded into the weights, so that the
float model computes exactly what it did while the activations the linear layers read lose their outlier channels.

Every vector on the residual stream turns from x to x Q: the embedding's rows E Q; each linear reading the stream
W Q, after the RMSNorm weight in front of it is folded into its columns (a norm weight is diagonal only in the
original basis, so the norms keep weight 1); each linear writing to it Q^T W; the head H diag(final norm) Q, a head
of its own even where the model tied it to the embedding. RMSNorm(x Q) = RMSNorm(x) Q because Q keeps lengths.
Each attention head's values turn by a per-head Qh as well: v_proj's rows of each kv head by Qh^T and o_proj's
columns of each head by Qh, exact because attention mixes positions, never the features of a head.

Everything is folded offline: the checkpoint holds plain weights in its usual layout, and nothing runs at inference
that did not run before. Q is a Hadamard matrix with random signs (a Hadamard matrix spreads a single outlier
channel evenly over all channels), Sylvester's 2^k times Paley's q+1 for a prime q = 3 mod 4 (576 = 12 * 48); a
seeded random orthogonal matrix where no such Hadamard matrix exists. Pure functions on tensors (llama, qwen2,
qwen3 layers: MLA and MoE layers are not rotated here).

down_proj's input, silu(gate) * up, is out of reach of any folded rotation; `hadamard_blocks` is the online one
(QuaRot's, SpinQuant's R4): the runtime turns the input by a block-diagonal Sylvester Hadamard matrix and the weight
holds W H, so the int8 activation quantization sees inputs without outlier channels.
"""
from __future__ import annotations

import math
import re

import torch

SEED = 0
# the linears of a decoder layer that read the residual stream, by the normalization in front of them
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # the linears whose outputs are added to the residual stream
_LLAMA_LAYER = re.compile(r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|input_layernorm|"
                          r"post_attention_layernorm|self_attn\.(q|k)_norm")


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4, float64 +-1."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[[(a * a) % q for a in range(1, q)]] = 1.0  # the quadratic character
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, chi[idx]  # skew: S^T = -S
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (H H^T = n I, entries +-1, float64) for n = 2^k * m with m = 1 or m = q + 1 for a
    prime q = 3 mod 4; None for other orders."""
    k = (n & -n).bit_length() - 1 if n > 0 else 0
    for j in range(k, -1, -1):  # the largest power of two that leaves a known block
        m = n >> j
        if m == 1:
            base = torch.ones(1, 1, dtype=torch.float64)
        elif m % 4 == 0 and _is_prime(m - 1):
            base = _paley(m - 1)
        else:
            continue
        h2 = torch.ones(1, 1, dtype=torch.float64)
        sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range(j):
            h2 = torch.kron(h2, sylvester)
        return torch.kron(h2, base)
    return None


def rotation_matrix(n: int, seed: int = SEED) -> torch.Tensor:
    """An orthogonal [n, n] float64 matrix: a Hadamard matrix with random row signs, scaled by 1/sqrt(n); where no
    Hadamard matrix of order n is known here, a random orthogonal one. The same n and seed give the same matrix."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * h / math.sqrt(n)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """t [..., n] times blockdiag(H_B, ..., H_B) / sqrt(B), H_B Sylvester's Hadamard matrix of order B (a power of two
    dividing n), in float64; back in t's dtype. The matrix is symmetric and orthogonal, so it is its own inverse:
    a linear's input x becomes x H and its weight [out, in] W H (QuaRot's online rotation of down_proj's input)."""
    if not is_power_of_two(block) or t.shape[-1] % block:
        raise ValueError(f"a Hadamard block of {block} needs a power of two dividing {t.shape[-1]}")
    h = hadamard(block).to(t.device) / math.sqrt(block)  # [B, B]
    rows = t.reshape(-1, t.shape[-1])
    out = torch.empty_like(rows)
    for i in range(0, rows.shape[0], 4096):  # float64 a few thousand rows at a time: a large weight stays small
        part = rows[i:i + 4096]
        out[i:i + 4096] = (_f64(part).unflatten(-1, (-1, block)) @ h).flatten(-2).to(t.dtype)
    return out.reshape(t.shape)


# ---------------------------------------------------------------------------------------------- single tensors
def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def fold_norm(w: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """A linear [out, in] reading norm(x) * norm_weight, made to read norm(x): columns times the norm weight."""
    return (_f64(w) * _f64(norm_weight)[None, :]).to(w.dtype)


def rotate_input(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A linear [out, in] that reads x Q instead of x: W Q."""
    return (_f64(w) @ q).to(w.dtype)


def rotate_output(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A linear [out, in] (or a bias [out]) whose output y is to become y Q: Q^T W (b Q)."""
    if w.ndim == 1:
        return (_f64(w) @ q).to(w.dtype)
    return (q.t() @ _f64(w)).to(w.dtype)


def rotate_head_outputs(w: torch.Tensor, qh: torch.Tensor, num_heads: int) -> torch.Tensor:
    """v_proj's weight [heads * d, in] (or bias) with each head's output turned by Qh [d, d]."""
    d = qh.shape[0]
    if w.shape[0] != num_heads * d:
        raise ValueError(f"v_proj has {w.shape[0]} outputs, not {num_heads} heads of {d}")
    return torch.cat([rotate_output(part, qh) for part in w.split(d, dim=0)], dim=0)


def rotate_head_inputs(w: torch.Tensor, qh: torch.Tensor, num_heads: int) -> torch.Tensor:
    """o_proj's weight [out, heads * d] reading each head's output turned by Qh [d, d]."""
    d = qh.shape[0]
    if w.shape[1] != num_heads * d:
        raise ValueError(f"o_proj has {w.shape[1]} inputs, not {num_heads} heads of {d}")
    return torch.cat([rotate_input(part, qh) for part in w.split(d, dim=1)], dim=1)


# ---------------------------------------------------------------------------------------------- checkpoint units
def rotate_embedding(tensors: dict[str, torch.Tensor], q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The embedding unit: every token's vector turned, E Q."""
    out = dict(tensors)
    out["model.embed_tokens.weight"] = rotate_input(tensors["model.embed_tokens.weight"], q)
    return out


def rotate_layer(tensors: dict[str, torch.Tensor], prefix: str, q: torch.Tensor, qh: torch.Tensor,
                 num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """One llama / qwen2 / qwen3 decoder layer's tensors (checkpoint names under `prefix`) with the residual stream
    turned by q [D, D] and each head's values by qh [d, d]; norms folded into the linears that read them."""
    for name in tensors:
        rel = name[len(prefix) + 1:].rpartition(".")[0]
        if not _LLAMA_LAYER.fullmatch(rel):
            raise ValueError(f"{name}: --rotate handles llama, qwen2 and qwen3 layers; this one is not")
    out = dict(tensors)
    for norm, readers in READERS.items():
        norm_weight = out[f"{prefix}.{norm}.weight"]
        for r in readers:
            out[f"{prefix}.{r}.weight"] = rotate_input(fold_norm(out[f"{prefix}.{r}.weight"], norm_weight), q)
        out[f"{prefix}.{norm}.weight"] = torch.ones_like(norm_weight)
    for wr in WRITERS:
        for leaf in ("weight", "bias"):
            if f"{prefix}.{wr}.{leaf}" in out:
                out[f"{prefix}.{wr}.{leaf}"] = rotate_output(out[f"{prefix}.{wr}.{leaf}"], q)
    for leaf in ("weight", "bias"):
        if f"{prefix}.self_attn.v_proj.{leaf}" in out:
            v = out[f"{prefix}.self_attn.v_proj.{leaf}"]
            out[f"{prefix}.self_attn.v_proj.{leaf}"] = rotate_head_outputs(v, qh, num_kv_heads)
    o = f"{prefix}.self_attn.o_proj.weight"
    out[o] = rotate_head_inputs(out[o], qh, num_heads)
    return out


def rotate_head(tensors: dict[str, torch.Tensor], q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head unit: `model.norm.weight` folded into the head (`lm_head.weight`, or the tied embedding's rows when
    there is none) and the head turned, H diag(w) Q; the norm keeps weight 1. Returns the norm and `lm_head.weight`."""
    norm = tensors["model.norm.weight"]
    head = tensors["lm_head.weight"] if "lm_head.weight" in tensors else tensors["model.embed_tokens.weight"]
    return {"model.norm.weight": torch.ones_like(norm), "lm_head.weight": rotate_input(fold_norm(head, norm), q)}
