"""Reading GGUF files (llama.cpp's format) with the `gguf` package: the model config from the metadata, and the
tensors under Hugging Face's names (with llama.cpp's q/k row permutation undone), dequantized to float32; and the
4-bit linear weights (Q4_0, Q4_1) as they are stored, for torch's CPU int4 GEMM (`StoredQ4Checkpoint`)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lowbit.config import ConfigError
from lowbit.layers.linear import LinearMethod
from lowbit.quant.config import QuantConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _reader(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueErrors/structs errors on bad files
        raise ConfigError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        if base not in _LAYER_NAMES:
            raise ConfigError(f"GGUF tensor {gguf_name}: unknown layer tensor {base!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[base]}.{kind}"
    if parts[0] not in _TOP_NAMES:
        raise ConfigError(f"GGUF tensor {gguf_name}: unknown tensor")
    return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"


def read_config(path: str) -> dict:
    """A Hugging Face-style config.json dict from the GGUF metadata."""
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in _ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    n_heads = _field(r, f"{arch}.attention.head_count")
    hidden = _field(r, f"{arch}.embedding_length")
    names = {t.name for t in r.tensors}
    return {
        "model_type": _ARCHS[arch],
        "vocab_size": _field(r, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None),
        "hidden_size": hidden,
        "intermediate_size": _field(r, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(r, f"{arch}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _field(r, f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": _field(r, f"{arch}.attention.key_length", hidden // n_heads),
        "rms_norm_eps": float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _field(r, f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows permuted for its rotary layout; undo it."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """w's rows (output features) in Hugging Face's order: llama.cpp permutes llama's q and k rows."""
    if config["model_type"] == "llama":
        if name.endswith("q_proj.weight"):
            return _unpermute(w, config["num_attention_heads"])
        if name.endswith("k_proj.weight"):
            return _unpermute(w, config["num_key_value_heads"])
    return w


def dequantized(t, name: str, config: dict) -> torch.Tensor:
    """One GGUF tensor (a reader's entry, Hugging Face `name`) dequantized to float32."""
    from gguf.quants import dequantize
    w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
    return torch.from_numpy(np.array(unpermute_rows(name, w, config), copy=True))


def iter_tensors(path: str, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor in the file, dequantized one at a time."""
    for t in _reader(path).tensors:
        name = hf_name(t.name)
        yield name, dequantized(t, name, config)


def tensor_types(path: str) -> dict[str, str]:
    """Hugging Face name -> GGML type name (F32, Q8_0, Q4_1, ...) of every tensor in the file."""
    return {hf_name(t.name): t.tensor_type.name for t in _reader(path).tensors}


def tensor_names(path: str) -> list[str]:
    return [hf_name(t.name) for t in _reader(path).tensors]


# ---------------------------------------------------------------------------------------------- 4-bit as stored
# Q4_0 and Q4_1 are both w = scale * code + min, code in 0..15, one float16 scale (and, for Q4_1, min) per 32 inputs
# (Q4_0: w = d * (code - 8), so min = -8d). Torch's CPU int4 GEMM computes w = (code - 8) * s + z per group of
# the same 32, so the stored codes go in as they are, with s = scale and z = min + 8 * scale.
STORED_Q4_TYPES = ("Q4_0", "Q4_1")
Q4_GROUP = 32


def stored_q4(t, name: str, config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor as stored: codes [N, K] uint8 in 0..15, and scale and min [N, K/32] float32 (exactly
    the file's float16 values), rows in Hugging Face's order; w = scale * code + min."""
    kind = t.tensor_type.name
    if kind not in STORED_Q4_TYPES:
        raise ValueError(f"GGUF tensor {t.name} is {kind}, not one of {', '.join(STORED_Q4_TYPES)}")
    rows = int(t.shape[1]) if len(t.shape) == 2 else 1
    blocks = np.asarray(t.data).reshape(rows, -1, 20 if kind == "Q4_1" else 18)  # [N, K/32, bytes]
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    else:
        low = -8 * scale
        nibbles = blocks[..., 2:]
    # byte i of a block holds element i (low nibble) and element i + 16 (high nibble)
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(rows, -1)
    return tuple(torch.from_numpy(np.ascontiguousarray(unpermute_rows(name, a, config))) for a in (codes, scale, low))


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, K/2] uint8, element 2j in the low nibble of byte j and 2j+1 in the high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """pack_codes undone: [N, K/2] uint8 -> [N, K] uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequant_q4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 weight: scale * code + min, rounded as the gguf package's dequantize rounds it."""
    codes = unpack_codes(packed).float().unflatten(-1, (-1, Q4_GROUP))  # [N, K/32, 32]
    return (codes * scale[..., None] + low[..., None]).flatten(-2)


def int4pack(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored Q4 weights in the layout of torch.ops.aten._weight_int4pack_mm_for_cpu: the codes packed for it, and
    scales and zeros [K/32, N, 2] in `dtype` (the activations' dtype), such that (code - 8) * s + z = scale * code +
    min (exact in float32; bfloat16 rounds s and z)."""
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(packed).to(torch.int32), 1)
    scales_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return weight, scales_zeros


def int4_gemm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the stored 4-bit weights have a fast kernel here: torch's CPU int4 GEMM, which is vectorized for
    bfloat16 activations (its float32 path is scalar, slower than a float32 GEMM of the dequantized weight)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Q4LinearMethod(LinearMethod):
    """A linear layer whose weight is GGUF Q4_0 / Q4_1 as stored: `weight_packed` [out, in/2] (two codes a byte),
    `weight_scale` and `weight_min` [out, in/32]. On the CPU with bfloat16 activations it multiplies through torch's
    int4 GEMM; elsewhere (or for shapes that kernel refuses) by the dequantized weight in the compute dtype."""

    def create_weights(self, layer) -> None:
        out_f, in_f = layer.out_per_partition, layer.in_per_partition
        if in_f % Q4_GROUP:
            raise ValueError(f"{layer.prefix}: input features {in_f} are not a multiple of the Q4 group {Q4_GROUP}")
        layer.register("weight_packed", torch.zeros(out_f, in_f // 2, dtype=torch.uint8), output_dim=0, input_dim=1)
        for name in ("weight_scale", "weight_min"):
            layer.register(name, torch.zeros(out_f, in_f // Q4_GROUP, dtype=torch.float32), output_dim=0,
                           input_dim=1)

    def process_weights_after_loading(self, layer) -> None:
        layer._int4 = layer._dequant = None
        if int4_gemm_runs(layer.weight_packed.device, layer.params_dtype) and layer.out_per_partition % 16 == 0:
            layer._int4 = int4pack(layer.weight_packed, layer.weight_scale, layer.weight_min, layer.params_dtype)
        else:
            layer._dequant = self.dequantized_weight(layer).to(layer.params_dtype)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer._int4 is not None:
            weight, scales_zeros = layer._int4
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(scales_zeros.dtype).contiguous(), weight, Q4_GROUP,
                                                           scales_zeros)  # [T, out]
            return y.to(x.dtype)
        return torch.nn.functional.linear(x, layer._dequant.to(x.dtype))

    def dequantized_weight(self, layer) -> torch.Tensor:
        return dequant_q4(layer.weight_packed, layer.weight_scale, layer.weight_min)


class StoredQ4Config(QuantConfig):
    """Q4LinearMethod for the layers whose weights a StoredQ4Checkpoint reads as stored; the rest unquantized."""
    name = "gguf-q4"

    def __init__(self, stored_layers: set[str]):
        self.stored_layers = stored_layers

    def linear_method(self, prefix: str) -> LinearMethod | None:
        return Q4LinearMethod() if prefix in self.stored_layers else None


class StoredQ4Checkpoint:
    """A GGUF checkpoint read with its 4-bit linear weights as stored, in place of `lowbit.models.loader.Checkpoint`
    for `build_model` / `load_weights`: a linear layer (merged ones too: q/k/v, gate/up) whose every part is Q4_0 or
    Q4_1 gets `<part>.weight_packed`, `.weight_scale`, `.weight_min` and a Q4LinearMethod (`quant_config()`); every
    other tensor is dequantized to float32, as Checkpoint reads it."""

    def __init__(self, ckpt, packed_modules_mapping: dict[str, tuple[str, int]]):
        self.ckpt, self.path, self.is_gguf, self.config_dict = ckpt, ckpt.path, True, ckpt.config_dict
        types = tensor_types(ckpt.path)
        layer_types: dict[str, list[str]] = {}  # model layer prefix -> its parts' types
        for name, kind in types.items():
            if name.endswith("_proj.weight"):
                layer_types.setdefault(self._layer_of(name, packed_modules_mapping), []).append(kind)
        parts = {merged: sum(1 for m, _ in packed_modules_mapping.values() if m == merged)
                 for merged, _ in packed_modules_mapping.values()}
        self.stored_layers = {prefix for prefix, kinds in layer_types.items()
                              if all(k in STORED_Q4_TYPES for k in kinds)
                              and len(kinds) == parts.get(prefix.rsplit(".", 1)[1], 1)}
        self.stored = {n for n in types if n.endswith("_proj.weight")
                       and self._layer_of(n, packed_modules_mapping) in self.stored_layers}

    @staticmethod
    def _layer_of(name: str, mapping: dict) -> str:
        """model.layers.0.self_attn.q_proj.weight -> model.layers.0.self_attn.qkv_proj (the model's layer)."""
        parent, module, _ = name.rsplit(".", 2)
        return f"{parent}.{mapping.get(module, (module, None))[0]}"

    def quant_config(self) -> QuantConfig:
        return StoredQ4Config(self.stored_layers)

    def model_config(self):
        return self.ckpt.model_config()

    def names(self) -> list[str]:
        out = []
        for n in self.ckpt.names():
            base = n[:-len("weight")]
            out += [base + p for p in ("weight_packed", "weight_scale", "weight_min")] if n in self.stored else [n]
        return out

    def file_of(self, name: str) -> str:
        return self.path

    def iter_tensors(self, names: list[str] | None = None, lazy: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for the given names (all when None): stored weights as their three tensors. `lazy` is
        Checkpoint's argument; GGUF tensors are read whole either way."""
        wanted = None if names is None else set(names)
        for t in _reader(self.path).tensors:
            name = hf_name(t.name)
            if name in self.stored:
                base = name[:-len("weight")]
                codes, scale, low = stored_q4(t, name, self.config_dict)
                items = [(base + "weight_packed", pack_codes(codes)), (base + "weight_scale", scale),
                         (base + "weight_min", low)]
            elif wanted is None or name in wanted:
                items = [(name, dequantized(t, name, self.config_dict))]
            else:
                items = []
            yield from ((n, x) for n, x in items if wanted is None or n in wanted)
