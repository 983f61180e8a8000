"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before int8 quantization.

For the linear layers that read one normalization's output, each input channel j is divided by
s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) on the activation side (folded into the norm's weight) and multiplied
by s_j on the weight side, so the float model computes exactly what it did. A router reading the same norm (MoE)
gets its columns multiplied too. A gated MLP's down_proj reads silu(gate) * up, so its input is smoothed through
up_proj's rows. Pure functions on tensors.
"""
from __future__ import annotations

import re

import torch

# which linear layers (module paths inside a decoder layer) read which normalization's output
MAPPINGS = [
    ("input_layernorm", re.compile(r"self_attn\.(qkv_proj|q_proj|q_a_proj|kv_a_proj_with_mqa)$")),
    ("self_attn.q_a_layernorm", re.compile(r"self_attn\.q_b_proj$")),
    ("post_attention_layernorm", re.compile(r"mlp\.((experts\.\d+|shared_experts)\.)?gate_up_proj$")),
]
# unquantized layers reading a norm's output whose columns follow the smoothing (the MoE router)
COMPENSATED = {"post_attention_layernorm": re.compile(r"mlp\.gate$")}
# linear layers whose input is smoothed through another linear's output rows: down_proj through up_proj
THROUGH_ROWS = (re.compile(r"down_proj$"), "up_proj")


def smoothing_factors(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per input channel s [in] from the activations' absolute maxima [in] and the weights [out_i, in] they feed."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_amax = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0)  # [in]
    a = act_amax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w_amax.clamp(min=1e-5).pow(1.0 - alpha)
    s = torch.where(act_amax > 0, s, torch.ones_like(s))  # channels never active: leave them alone
    return s.clamp(min=1e-5)


def smooth_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The normalization's weight with its output divided by s."""
    return (norm_weight.float() / s).to(norm_weight.dtype)


def smooth_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] reading the smoothed activations: columns multiplied by s."""
    return (w.float() * s[None, :]).to(w.dtype)


def smooth_rows(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] whose outputs feed the smoothed activations: rows divided by s."""
    return (w.float() / s[:, None]).to(w.dtype)
