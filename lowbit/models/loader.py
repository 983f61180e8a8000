"""Reading a checkpoint (a Hugging Face folder of safetensors shards, or a GGUF file) into a lowbit model.

Safetensors and GGUF only: never pickle, never remote code. Every error names the file and the tensor.

Under tensor/expert parallel each rank reads only its own part of the shards: routed experts it does not own are
skipped by name, and every other tensor reaches its parameter's `weight_loader` as a `LazyTensor`, so the slice the
loader cuts for this rank (`narrow`, `t[a:b]`) is all that is read from the file.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from torch import nn

from lowbit.config import ConfigError, ModelConfig
from lowbit.kernels.linear import activation_kind
from lowbit.kernels.matmul_packed import ACT_INT8_TOKEN
from lowbit.layers.norm import RMSNorm
from lowbit.quant.config import quant_config_for

INCOMPLETE_MARKER = ".lowbit-incomplete"


class CheckpointError(ValueError):
    """The checkpoint on disk does not hold what its config says."""


class Checkpoint:
    """A model on disk: its config.json (or GGUF metadata) and its tensors, read lazily one at a time."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such file or directory")
        self.path = path
        self.is_gguf = os.path.isfile(path) and path.endswith(".gguf")
        if self.is_gguf:
            from lowbit.quant import gguf
            self.config_dict = gguf.read_config(path)
            self._names = {n: path for n in gguf.tensor_names(path)}
            return
        if os.path.isfile(path):
            raise ConfigError(f"{path}: expected a model folder (config.json + safetensors) or a .gguf file")
        if os.path.exists(os.path.join(path, INCOMPLETE_MARKER)):
            raise CheckpointError(f"{path}: this checkpoint is incomplete (a quantization was interrupted); "
                                  f"run the same lowbit quantize command again to finish it")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ConfigError(f"{cfg_path}: no such file (is {path} a Hugging Face model folder?)")
        with open(cfg_path) as f:
            try:
                self.config_dict = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        if any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(path)) and not any(
                name.endswith(".safetensors") for name in os.listdir(path)):
            raise CheckpointError(f"{path}: only pickle weights (.bin/.pt) found; lowbit reads safetensors only")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._names = {n: os.path.join(path, f) for n, f in weight_map.items()}
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no .safetensors files")
            from safetensors import safe_open
            self._names = {}
            for fn in files:
                with safe_open(os.path.join(path, fn), "pt") as f:
                    for n in f.keys():
                        self._names[n] = os.path.join(path, fn)

    def model_config(self) -> ModelConfig:
        src = self.path if self.is_gguf else os.path.join(self.path, "config.json")
        return ModelConfig.from_dict(self.config_dict, source=src)

    def names(self) -> list[str]:
        return list(self._names)

    def file_of(self, name: str) -> str:
        return self._names[name]

    def iter_tensors(self, names: list[str] | None = None, lazy: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        """(name, tensor) for the given names (all when None), opening each shard once. lazy: safetensors tensors
        come as LazyTensors, read (in the part their consumer keeps) before the next one is yielded."""
        if self.is_gguf:
            from lowbit.quant import gguf
            wanted = None if names is None else set(names)
            for n, t in gguf.iter_tensors(self.path, self.config_dict):
                if wanted is None or n in wanted:
                    yield n, t
            return
        from safetensors import safe_open
        by_file: dict[str, list[str]] = {}
        for n in (self._names if names is None else names):
            if n not in self._names:
                raise CheckpointError(f"{self.path}: no tensor named {n}")
            by_file.setdefault(self._names[n], []).append(n)
        for fn, ns in by_file.items():
            if not os.path.exists(fn):
                raise CheckpointError(f"{fn}: shard listed in model.safetensors.index.json is missing")
            with safe_open(fn, "pt") as f:
                for n in ns:
                    if lazy:
                        sl = f.get_slice(n)
                        yield n, LazyTensor(sl, sl.get_shape(), _SAFETENSORS_DTYPES.get(sl.get_dtype()))
                    else:
                        yield n, f.get_tensor(n)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _unwrap(x):
    if isinstance(x, LazyTensor):
        return x.read()
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


class LazyTensor:
    """A checkpoint tensor not read yet (a safetensors slice). `narrow` and plain slicing (`t[a:b]`, `t[:, a:b]`)
    narrow the view and read nothing; anything else (a torch function such as `param.copy_(t)`, a tensor method or
    attribute) reads the viewed part from the file then and acts on that tensor. Read it before the iterator that
    gave it moves on."""

    def __init__(self, source, shape, dtype: torch.dtype | None, ranges: list[tuple[int, int]] | None = None,
                 device: torch.device | None = None):
        self._source = source  # indexable by a tuple of slices, as safetensors' get_slice() is
        self._ranges = ranges if ranges is not None else [(0, int(d)) for d in shape]
        self._dtype = dtype
        self._device = device
        self.shape = torch.Size(b - a for a, b in self._ranges)

    def _view(self, ranges: list[tuple[int, int]], device=None) -> LazyTensor:
        return LazyTensor(self._source, None, self._dtype, ranges, device if device is not None else self._device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype if self._dtype is not None else self.read().dtype

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return self.shape[0]

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = dim % self.dim()
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for shape {tuple(self.shape)}")
        ranges = list(self._ranges)
        a = ranges[dim][0] + start
        ranges[dim] = (a, a + length)
        return self._view(ranges)

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if len(keys) > self.dim() or not all(isinstance(k, slice) and k.step in (None, 1) for k in keys):
            return self.read()[key]
        out = self
        for dim, k in enumerate(keys):
            start, stop, _ = k.indices(out.shape[dim])
            out = out.narrow(dim, start, max(0, stop - start))
        return out

    def to(self, *args, **kwargs):
        """Moving to a device stays lazy (the slice is read straight to it); anything else reads."""
        if not kwargs and len(args) == 1 and isinstance(args[0], (torch.device, str)):
            return self._view(self._ranges, torch.device(args[0]))
        return self.read().to(*args, **kwargs)

    def read(self) -> torch.Tensor:
        """The viewed part as a tensor (read from the file now)."""
        t = self._source[tuple(slice(a, b) for a, b in self._ranges)] if self._ranges else self._source[...]
        return t if self._device is None else t.to(self._device)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_unwrap(args), **_unwrap(kwargs or {}))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.read(), name)

    def __iter__(self):
        return iter(self.read())

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self._dtype})"


def _default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


def model_class(cfg: ModelConfig):
    if cfg.is_deepseek:
        from lowbit.models.deepseek import DeepseekForCausalLM
        return DeepseekForCausalLM
    from lowbit.models.llama import LlamaForCausalLM
    return LlamaForCausalLM


def param_target(model: nn.Module, name: str) -> tuple[str, int | None]:
    """The model parameter a checkpoint tensor loads into, and its shard of a merged layer."""
    to_param = getattr(model, "checkpoint_to_param_name", None)
    if to_param is not None:
        name = to_param(name)
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in model.packed_modules_mapping:
            merged, shard = model.packed_modules_mapping[part]
            parts[i] = merged
            return ".".join(parts), shard
    return name, None


def build_model(ckpt: Checkpoint, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                quant_config=None) -> nn.Module:
    quant_config = quant_config if quant_config is not None else quant_config_for(cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # norms and other plain parameters in the model dtype too
    try:
        with torch.device(device):
            return model_class(cfg)(cfg, quant_config, dtype, checkpoint_names=ckpt.names())
    finally:
        torch.set_default_dtype(previous)


def load_weights(model: nn.Module, ckpt: Checkpoint, device: torch.device) -> None:
    """Load every tensor into its parameter; fail naming the tensor on a missing, extra or misshapen one. Each
    parameter's weight_loader gets a LazyTensor, so only the part of the tensor this rank keeps is read."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[tuple[str, int | None]] = set()
    skips = getattr(model, "skips_checkpoint_tensor", lambda name: False)
    names = [n for n in ckpt.names() if "rotary_emb.inv_freq" not in n and not skips(n)]
    for name, tensor in ckpt.iter_tensors(names, lazy=True):
        pname, shard = param_target(model, name)
        param = params.get(pname)
        if param is None:
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name} has no place in a "
                                  f"{model.config.model_type} model of this config")
        loader = getattr(param, "weight_loader", _default_weight_loader)
        try:
            loader(param, tensor.to(device), shard) if shard is not None else loader(param, tensor.to(device))
        except ValueError as e:
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name}: {e}") from None
        loaded.add((pname, shard))
    _check_complete(model, params, loaded, ckpt)
    for module in model.modules():
        qm = getattr(module, "quant_method", None)
        if qm is not None:
            qm.process_weights_after_loading(module)
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None:
            hook()
    # where layers take int8 per-token activations (w8a8, w4a8-int8), the norms before them quantize their output in
    # their own launch (norm_rope.rms_norm): one launch a norm fewer at decode
    int8 = any(activation_kind(getattr(m.quant_method, "input_activations", None)) == ACT_INT8_TOKEN
               for m in model.modules() if getattr(m, "quant_method", None) is not None)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.int8_rows = int8


def _check_complete(model, params: dict, loaded: set, ckpt: Checkpoint) -> None:
    """Every parameter (every shard of a merged one) was loaded; a tied parameter counts once for both names."""
    parts: dict[str, dict[int, str]] = {}  # merged module -> shard -> checkpoint module
    for orig, (merged, shard) in model.packed_modules_mapping.items():
        parts.setdefault(merged, {})[shard] = orig
    loaded_params = {id(params[name]) for name, _ in loaded}
    for pname, param in params.items():
        merged = next((p for p in pname.split(".")[:-1] if p in parts), None)
        shards = parts[merged] if merged else {None: None}
        for shard, orig in shards.items():
            if (pname, shard) in loaded or (merged is None and id(param) in loaded_params):
                continue
            name = pname if merged is None else pname.replace(f".{merged}.", f".{orig}.")
            raise CheckpointError(f"{ckpt.path}: checkpoint is missing tensor {name}")
