"""Rotary position embeddings: default, linear, llama3 and YaRN (with DeepSeek's mscale), neox or interleaved."""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.kernels.linear import kernels_enabled
from lowbit.kernels.norm_rope import rope


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, p: dict) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    orig = p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_get_mscale(factor))

    def correction_dim(num_rotations):
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale (YaRN's attention factor; 1 otherwise)."""
    rtype = (scaling or {}).get("rope_type", "default")
    if rtype == "yarn":
        return _yarn_inv_freq(dim, base, scaling)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rtype == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rtype == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """Rotates the last `dim` features of q and k by position; `interleaved` pairs (x0,x1),(x2,x3)... as DeepSeek."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None, interleaved: bool = False):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(dim, base, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = interleaved
        self._cache = None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dim/2]
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)

    def cached_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin, computed once per positions tensor (every layer of a step passes the same one)."""
        if self._cache is not None and self._cache[0] is positions and self._cache[1] == dtype:
            return self._cache[2]
        cs = self.cos_sin(positions, dtype)
        self._cache = (positions, dtype, cs)
        return cs

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, dim]; cos/sin [T, dim/2]."""
        if x.is_cuda and kernels_enabled(x.device) and x.stride(-1) == 1:
            return rope(x, cos, sin, self.interleaved)
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.cached_cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
