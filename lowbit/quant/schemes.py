"""The registry of quantization schemes.

A scheme is an object: what its weights and activations are (in compressed-tensors' vocabulary, so that the
checkpoint's `quantization_config` is written from it), how many bytes it costs, and which linear method runs it.
Code chooses a scheme with `get_scheme(name)`, never by comparing names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class QuantArgs:
    """One tensor's quantization, as compressed-tensors' QuantizationArgs names it."""
    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # "tensor" | "channel" | "group" | "block" | "token"
    symmetric: bool = True
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    dynamic: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "num_bits": self.num_bits, "type": self.type, "strategy": self.strategy,
            "symmetric": self.symmetric, "dynamic": self.dynamic,
        }
        if self.group_size is not None:
            d["group_size"] = self.group_size
        if self.block_structure is not None:
            d["block_structure"] = list(self.block_structure)
        return d


@dataclass(frozen=True)
class Scheme:
    name: str
    weights: QuantArgs
    input_activations: QuantArgs | None  # None: activations stay in the model's dtype (bf16)
    format: str  # compressed-tensors format: pack-quantized | int-quantized | float-quantized
    needs_fp8: bool  # needs FP8 tensor cores (Hopper, Ada, Blackwell)
    description: str
    scale_bytes: int = 2  # bytes of one weight scale as stored (bf16 for int schemes, fp32 for fp8-block)

    # ------------------------------------------------------------------ options
    def with_options(self, group_size: int | None = None, symmetric: bool | None = None,
                     dynamic: bool | None = None, act_group_size: int | None = None) -> "Scheme":
        """The same scheme with a different group size, symmetry, activation dynamism or (w8a8) activation groups,
        checked."""
        w, a = self.weights, self.input_activations
        if group_size is not None:
            if w.strategy not in ("group", "channel"):
                raise ValueError(f"scheme {self.name}: --group-size does not apply to {w.strategy} weights")
            if group_size <= 0:
                raise ValueError(f"scheme {self.name}: group size must be > 0, got {group_size}")
            w = replace(w, strategy="group", group_size=group_size)
        if symmetric is not None and symmetric != w.symmetric:
            if w.type != "int" or self.name not in ("w4a16", "w8a16"):
                raise ValueError(f"scheme {self.name}: asymmetric weights are supported only for w4a16 and w8a16")
            w = replace(w, symmetric=symmetric)
        if dynamic is not None and a is not None and dynamic != a.dynamic:
            if self.name != "w4a8":
                raise ValueError(f"scheme {self.name}: --dynamic applies only to w4a8")
            a = replace(a, dynamic=dynamic, strategy="token" if dynamic else "tensor")
        if act_group_size is not None:
            if self.name != "w8a8":
                raise ValueError(f"scheme {self.name}: --act-group-size applies only to w8a8")
            if act_group_size != INT8_ACT_GROUP:
                raise ValueError(f"w8a8: activation groups of {INT8_ACT_GROUP} features only (llama.cpp Q8_0's "
                                 f"block; the int8 kernels scale each {INT8_ACT_GROUP}-feature K step), got "
                                 f"{act_group_size}")
            a = replace(a, strategy="group", group_size=act_group_size)
        return replace(self, weights=w, input_activations=a)

    # ------------------------------------------------------------------ sizes
    @property
    def weight_bits(self) -> int:
        return self.weights.num_bits

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes one [out_features, in_features] weight takes in this scheme: values, scales, zero points."""
        w = self.weights
        values = math.ceil(out_features * in_features * w.num_bits / 8)
        if w.strategy == "channel":
            n_scales = out_features
        elif w.strategy == "group":
            n_scales = out_features * math.ceil(in_features / w.group_size)
        elif w.strategy == "block":
            bo, bi = w.block_structure
            n_scales = math.ceil(out_features / bo) * math.ceil(in_features / bi)
        else:
            n_scales = 1
        zero_points = 0 if w.symmetric else math.ceil(n_scales * w.num_bits / 8)
        act_scale = 4 if (self.input_activations is not None and not self.input_activations.dynamic) else 0
        return values + n_scales * self.scale_bytes + zero_points + act_scale

    # ------------------------------------------------------------------ checkpoint
    def config_group(self, targets: list[str]) -> dict[str, Any]:
        """This scheme as one compressed-tensors config group."""
        return {
            "targets": list(targets),
            "weights": self.weights.to_dict(),
            "input_activations": None if self.input_activations is None else self.input_activations.to_dict(),
            "output_activations": None,
            "format": self.format,
        }


# w8a8's optional int8 activation groups (--act-group-size): one dynamic scale per token and 32 features, where the
# scheme's default is one per token. On the default model, GPTQ + rotate + online Hadamard 256 + SmoothQuant auto,
# 4096 tokens: mean KLD 0.00215 per token, 0.00179 per 128 features, 0.00148 per 32, against llama.cpp Q8_0's 0.00153
# (benchmarks/results/w8a8-act-groups-cpu-2026-11-24-oh256-sq.md). compressed-tensors writes it as input_activations
# {strategy: group, group_size: 32, dynamic: true}, as fp8-block's groups of 128; vLLM's int8 path takes per-token
# scales only, so such a checkpoint runs on lowbit
INT8_ACT_GROUP = 32

_INT4_G128 = QuantArgs(num_bits=4, type="int", strategy="group", symmetric=True, group_size=128)
_INT8_CHANNEL = QuantArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
_INT8_TOKEN = QuantArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
_FP8_TENSOR_STATIC = QuantArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)

SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("w4a8", _INT4_G128, _FP8_TENSOR_STATIC, "pack-quantized", needs_fp8=True,
           description="int4 symmetric weights (group 128), FP8 e4m3 activations with static per-tensor scales"),
    Scheme("w4a8-int8", _INT4_G128, _INT8_TOKEN, "pack-quantized", needs_fp8=False,
           description="int4 symmetric weights (group 128), int8 per-token dynamic activations"),
    Scheme("w8a8", _INT8_CHANNEL, _INT8_TOKEN, "int-quantized", needs_fp8=False,
           description="int8 per-channel weights, int8 per-token dynamic activations"),
    Scheme("w8a16", _INT8_CHANNEL, None, "pack-quantized", needs_fp8=False,
           description="int8 per-channel (or group) weights, bf16 activations"),
    Scheme("w4a16", _INT4_G128, None, "pack-quantized", needs_fp8=False,
           description="int4 weights (group 128, symmetric or asymmetric), bf16 activations"),
    Scheme("fp8-block", QuantArgs(num_bits=8, type="float", strategy="block", symmetric=True,
                                  block_structure=(128, 128)),
           QuantArgs(num_bits=8, type="float", strategy="group", symmetric=True, group_size=128, dynamic=True),
           "float-quantized", needs_fp8=True, scale_bytes=4,
           description="FP8 e4m3 weights with 128x128 block scales, FP8 per-token-group dynamic activations"),
    Scheme("bf16", QuantArgs(num_bits=16, type="float", strategy="tensor"), None, "dense", needs_fp8=False,
           scale_bytes=0, description="unquantized bf16 (the reference)"),
)}

# What stays unquantized unless a recipe says otherwise: the output head and the MoE router.
DEFAULT_IGNORE = ["lm_head", "re:.*mlp.gate$"]


def get_scheme(name: str, **options) -> Scheme:
    """The scheme registered as `name`, with options applied (see Scheme.with_options)."""
    try:
        scheme = SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r} (known: {', '.join(SCHEMES)})") from None
    opts = {k: v for k, v in options.items() if v is not None}
    return scheme.with_options(**opts) if opts else scheme
