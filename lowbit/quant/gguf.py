"""Reading GGUF files (llama.cpp's format) with the `gguf` package: the model config from the metadata, and the
tensors dequantized to float32 under Hugging Face's names (with llama.cpp's q/k row permutation undone)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lowbit.config import ConfigError

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


def iter_tensors(path: str, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor in the file, dequantized one at a time."""
    from gguf.quants import dequantize
    r = _reader(path)
    for t in r.tensors:
        name = hf_name(t.name)
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if config["model_type"] == "llama":
            if name.endswith("q_proj.weight"):
                w = _unpermute(w, config["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                w = _unpermute(w, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(w, copy=True))


def tensor_names(path: str) -> list[str]:
    return [hf_name(t.name) for t in _reader(path).tensors]
