"""Which linear method each layer of a checkpoint uses, read from the checkpoint's `quantization_config`.

Model files call `quant_config.linear_method(prefix)` for every linear layer they build and never look at the
scheme themselves. Each checkpoint format registers a QuantConfig subclass under its `quant_method` name.
"""
from __future__ import annotations

import re

from lowbit.config import ConfigError, ModelConfig
from lowbit.layers.linear import LinearMethod


def matches(name: str, pattern: str) -> bool:
    """compressed-tensors' target syntax: `re:REGEX` is a regex search, anything else the name or its last parts."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


class QuantConfig:
    """No quantization: every layer gets the unquantized method."""
    name = "none"

    def linear_method(self, prefix: str) -> LinearMethod | None:
        return None


class Fp8BlockConfig(QuantConfig):
    """DeepSeek's native checkpoint: `{"quant_method": "fp8", "weight_block_size": [128, 128]}`; fp8 e4m3 weights with
    a float32 `weight_scale_inv` per block, used as they are. Layers absent from the checkpoint's fp8 set (the
    router, norms, embeddings, lm_head) stay in the model dtype."""
    name = "fp8"

    def __init__(self, block_size: tuple[int, int], ignore: list[str]):
        self.block_size = block_size
        self.ignore = ignore

    def linear_method(self, prefix: str) -> LinearMethod | None:
        from lowbit.quant.methods import Fp8BlockLinearMethod
        if any(matches(prefix, p) for p in self.ignore):
            return None
        return Fp8BlockLinearMethod(self.block_size, scale_name="weight_scale_inv")


def _fp8_from_dict(d: dict) -> QuantConfig:
    bs = d.get("weight_block_size")
    if not bs or len(bs) != 2:
        raise ConfigError("quantization_config.weight_block_size: fp8 checkpoints need a [rows, cols] block size")
    return Fp8BlockConfig(tuple(bs), d.get("ignored_layers") or d.get("modules_to_not_convert") or [])


def _compressed_tensors_from_dict(d: dict) -> QuantConfig:
    from lowbit.quant.compressed import CompressedTensorsConfig  # noqa: PLC0415
    return CompressedTensorsConfig.from_dict(d)


FORMATS = {"fp8": _fp8_from_dict, "compressed-tensors": _compressed_tensors_from_dict}


def quant_config_for(cfg: ModelConfig) -> QuantConfig:
    d = cfg.quantization_config
    if not d:
        return QuantConfig()
    method = d.get("quant_method")
    if method not in FORMATS:
        raise ConfigError(f"quantization_config.quant_method: {method!r} is not supported "
                          f"(supported: {', '.join(FORMATS)})")
    return FORMATS[method](d)
