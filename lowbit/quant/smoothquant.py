"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before int8 quantization.

For the linear layers that read one normalization's output, each input channel j is divided by
s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) on the activation side (folded into the norm's weight) and multiplied
by s_j on the weight side, so the float model computes exactly what it did. A router reading the same norm (MoE)
gets its columns multiplied too. A gated MLP's down_proj reads silu(gate) * up, so its input is smoothed through
up_proj's rows; o_proj reads each head's attention-weighted values, so its input is smoothed through v_proj's rows
(one factor per kv head's feature, shared by the query heads that read it).

With alpha searched ("auto"), each group of linears gets the factors that make its int8 output error on the
calibration inputs least, as AWQ searches its scales: candidates stat_j^alpha / max|W_:,j|^(1-alpha) for
stat = max|X_j| and stat = rms(X_j), alpha on a grid, and no smoothing at all; each candidate is judged by
quantizing both sides as the scheme will (`output_error`). Pure functions on tensors.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

# which linear layers (module paths inside a decoder layer) read which normalization's output
MAPPINGS = [
    ("input_layernorm", re.compile(r"self_attn\.(qkv_proj|q_proj|q_a_proj|kv_a_proj_with_mqa)$")),
    ("self_attn.q_a_layernorm", re.compile(r"self_attn\.q_b_proj$")),
    ("post_attention_layernorm", re.compile(r"mlp\.((experts\.\d+|shared_experts)\.)?gate_up_proj$")),
]
# unquantized layers reading a norm's output whose columns follow the smoothing (the MoE router)
COMPENSATED = {"post_attention_layernorm": re.compile(r"mlp\.gate$")}
# linear layers whose input is smoothed through another linear's output rows: down_proj through up_proj, o_proj
# through v_proj (same module path but the last part)
THROUGH_ROWS = [(re.compile(r"mlp\.(.*\.)?down_proj$"), "up_proj"), (re.compile(r"self_attn\.o_proj$"), "v_proj")]
SEARCH_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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


def share_across_heads(s: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj's input factors [heads * d] made equal across the query heads that read one kv head's values (the
    largest of theirs), as smoothing through v_proj's rows needs: [heads * d], heads of a kv head adjacent."""
    group = s.shape[0] // (num_kv_heads * head_dim)
    shared = s.view(num_kv_heads, group, head_dim).amax(dim=1, keepdim=True)  # [kv, 1, d]
    return shared.expand(num_kv_heads, group, head_dim).reshape(-1)


def kv_rows(s: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The v_proj rows' factors [kv * d] of o_proj's shared input factors [heads * d]."""
    return s.view(num_kv_heads, -1, head_dim)[:, 0].reshape(-1)


def output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor,
                 quantize_act: Callable[[torch.Tensor], torch.Tensor],
                 quantize_weight: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Mean over the weights [out_i, in] of ||x W^T - qa(x / s) qw(W s)^T||^2 / ||x W^T||^2 on inputs x [n, in]:
    what smoothing by s leaves of the quantization error of linears reading x."""
    xq = quantize_act(x.float() / s)  # [n, in]
    errs = []
    for w in weights:
        ref = x.float() @ w.float().t()  # [n, out]
        y = xq @ quantize_weight(w.float() * s[None, :]).t()
        errs.append(((y - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30)).item())
    return sum(errs) / len(errs)


def candidate_factors(x: torch.Tensor, weights: list[torch.Tensor], alphas=SEARCH_ALPHAS) -> list[torch.Tensor]:
    """SmoothQuant's factors for each alpha, from the channels' largest |x| and from their rms: [in] each."""
    out = []
    for stat in (x.abs().amax(dim=0).float(), x.float().pow(2).mean(dim=0).sqrt()):
        for alpha in alphas:
            out.append(smoothing_factors(stat, weights, alpha))
    return out


def search_factors(x: torch.Tensor, weights: list[torch.Tensor],
                   quantize_act: Callable[[torch.Tensor], torch.Tensor],
                   quantize_weight: Callable[[torch.Tensor], torch.Tensor], alphas=SEARCH_ALPHAS,
                   constrain: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor | None, float, float]:
    """The candidate factors [in] (or None: no smoothing) with the least `output_error` for linears `weights`
    reading x [n, in]; `constrain` maps each candidate to one the model can fold (o_proj's shared heads).
    Returns (factors, error without smoothing, error with them)."""
    none = output_error(x, weights, torch.ones(x.shape[1]), quantize_act, quantize_weight)
    best, best_err = None, none
    for s in candidate_factors(x, weights, alphas):
        if constrain is not None:
            s = constrain(s)
        err = output_error(x, weights, s, quantize_act, quantize_weight)
        if err < best_err:
            best, best_err = s, err
    return best, none, best_err
