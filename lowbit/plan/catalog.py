"""What plan knows without a download: GPU types (data/gpus.json) and built-in model configs (data/models/*.json)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

from lowbit.config import ConfigError, ModelConfig

GIB = 1 << 30

# names users type for the built-in configs, besides the file names themselves
MODEL_ALIASES = {
    "r1": "deepseek-r1",
    "v3": "deepseek-v3",
    "moonlight": "moonlight-16b-a3b",
    "default": "smollm2-135m-instruct",
    "smollm2": "smollm2-135m-instruct",
}


@dataclass(frozen=True, slots=True)
class GPU:
    name: str
    memory_bytes: int  # as the device reports it (nvidia-smi / npu-smi), before any utilization limit
    fp8: bool  # FP8 tensor cores (Hopper, Ada, Blackwell)
    gpus_per_node: int = 8

    def __post_init__(self):
        if self.memory_bytes <= 0:
            raise ValueError(f"GPU {self.name}: memory must be > 0")
        if self.gpus_per_node <= 0:
            raise ValueError(f"GPU {self.name}: gpus_per_node must be > 0")


def _data(path: str):
    return resources.files("lowbit").joinpath("data", *path.split("/"))


def gpu_types() -> dict[str, GPU]:
    """The GPU types in data/gpus.json, by name."""
    entries = json.loads(_data("gpus.json").read_text())["gpus"]
    return {e["name"]: GPU(e["name"], e["memory_mib"] << 20, e["fp8"], e.get("gpus_per_node", 8)) for e in entries}


def resolve_gpu(name: str | None, memory_gib: float | None, fp8: bool | None = None) -> GPU:
    """A known GPU type by name (case-insensitive), or a custom one from --gpu-memory GiB."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ValueError(f"--gpu-memory must be > 0 GiB, got {memory_gib}")
        return GPU(name or f"custom-{memory_gib:g}G", int(memory_gib * GIB), bool(fp8))
    known = gpu_types()
    if name is None:
        raise ValueError(f"give --gpu TYPE ({', '.join(known)}) or --gpu-memory GiB")
    by_lower = {k.lower(): v for k, v in known.items()}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown GPU type {name!r} (known: {', '.join(known)}; any other: --gpu-memory GiB)")
    gpu = by_lower[name.lower()]
    return gpu if fp8 is None else GPU(gpu.name, gpu.memory_bytes, fp8, gpu.gpus_per_node)


def builtin_models() -> list[str]:
    return sorted(p.name[:-len(".json")] for p in _data("models").iterdir() if p.name.endswith(".json"))


def load_model_config(model: str) -> tuple[str, ModelConfig]:
    """(display name, config) for a built-in name, a config.json, a checkpoint folder or a GGUF file."""
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
        if os.path.exists(path):
            return os.path.basename(os.path.normpath(model)), ModelConfig.from_json_file(path)
        ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if not ggufs:
            raise ConfigError(f"{model}: no config.json or .gguf file in this folder")
        model = os.path.join(model, ggufs[0])
    if os.path.isfile(model):
        if model.endswith(".gguf"):
            from lowbit.quant.gguf import read_config
            return os.path.basename(model), ModelConfig.from_dict(read_config(model), source=model)
        return os.path.basename(os.path.dirname(os.path.abspath(model))), ModelConfig.from_json_file(model)
    key = MODEL_ALIASES.get(model.lower(), model.lower())
    if key not in builtin_models():
        raise ConfigError(f"{model}: neither a file nor a built-in model "
                          f"(built-in: {', '.join(builtin_models())}; aliases: {', '.join(MODEL_ALIASES)})")
    d = json.loads(_data(f"models/{key}.json").read_text())
    return key, ModelConfig.from_dict(d, source=f"built-in {key}")
