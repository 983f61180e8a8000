"""Calibration math: running one decoder layer on its own over the calibration tokens, capturing what each linear
layer reads, and the static activation scales made from it. No file I/O (the driver reads and writes).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lowbit.layers.attention import prefill_context, reset_context, set_context
from lowbit.layers.linear import LinearBase
from lowbit.quant.formats import FP8_MAX

CACHE_BLOCK = 16


@dataclass
class CalibState:
    """What flows from one layer to the next: the hidden state of every calibration token, and the token ids of
    each sequence (the hidden rows are the sequences one after another)."""
    hidden: torch.Tensor  # [T, D]
    seqs: list[list[int]]

    @property
    def seq_lens(self) -> list[int]:
        return [len(s) for s in self.seqs]

    def positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(n) for n in self.seq_lens])  # [T]

    def ids(self) -> torch.Tensor:
        return torch.tensor([t for s in self.seqs for t in s], dtype=torch.long)  # [T]


def calibration_sequences(token_ids: list[int], num_tokens: int, seq_len: int) -> list[list[int]]:
    """The first num_tokens of a token stream cut into sequences of seq_len (the last may be shorter)."""
    if len(token_ids) < min(num_tokens, 2):
        raise ValueError(f"the calibration text has {len(token_ids)} tokens; at least 2 are needed")
    ids = token_ids[:num_tokens]
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2]


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], packed: dict[str, tuple[str, int]]) -> None:
    """Load checkpoint tensors (names relative to `module`) through each parameter's weight_loader; merged layers
    take their parts at the shard `packed` names. Every parameter must be covered."""
    params = dict(module.named_parameters())
    loaded = set()
    for name, t in tensors.items():
        parts = name.split(".")
        shard = None
        for i, p in enumerate(parts[:-1]):
            if p in packed:
                parts[i], shard = packed[p]
                break
        pname = ".".join(parts)
        if pname not in params:
            raise ValueError(f"tensor {name} has no place in this layer")
        param = params[pname]
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if tuple(param.shape) != tuple(t.shape):
                raise ValueError(f"tensor {name} of shape {tuple(t.shape)} does not fit {tuple(param.shape)}")
            param.data.copy_(t)
        elif shard is None:
            loader(param, t)
        else:
            loader(param, t, shard)
        loaded.add(pname)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"no tensor for {', '.join(missing)}")
    for m in module.modules():
        if isinstance(m, LinearBase):
            m.quant_method.process_weights_after_loading(m)
    for m in module.modules():
        hook = getattr(m, "process_weights_after_loading", None)
        if hook is not None and not isinstance(m, LinearBase):
            hook()


def _attention_modules(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if hasattr(m, "bind_cache")]


@torch.inference_mode()
def run_layer(block: nn.Module, x: torch.Tensor, seq_lens: list[int], positions: torch.Tensor,
              forward=None) -> torch.Tensor:
    """One decoder layer over whole sequences, x [T, D] -> [T, D], in a paged cache of its own."""
    ctx, num_blocks = prefill_context(seq_lens, CACHE_BLOCK, x.device)
    for m in _attention_modules(block):
        m.bind_cache([torch.zeros(s, dtype=x.dtype, device=x.device) for s in m.cache_shape(num_blocks, CACHE_BLOCK)])
    set_context(ctx)
    try:
        out = (forward or block)(positions, x)
        if isinstance(out, tuple):  # a decoder block: (its MLP output, the running sum before it)
            out = out[1] + out[0]
        return out
    finally:
        reset_context()
        for m in _attention_modules(block):
            m.bind_cache([torch.tensor([]) for _ in m.cache_shape(1, CACHE_BLOCK)])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


def mtp_inputs(state: CalibState, prev_norm: torch.Tensor, eps: float) -> tuple[CalibState, torch.Tensor]:
    """An MTP layer predicts token t+2 from the previous stage's normalized hidden state at t and token t+1:
    the state it reads (each sequence one shorter, its ids the next tokens) and that normalized hidden [T', D]."""
    keep, start = [], 0
    for n in state.seq_lens:
        keep.append(torch.arange(start, start + n - 1))
        start += n
    hidden = rms_norm(state.hidden[torch.cat(keep)], prev_norm, eps)
    return CalibState(hidden, [s[1:] for s in state.seqs]), hidden


# linear layers the model never calls, having absorbed their weight elsewhere, and the sibling module whose output
# is their input: MLA multiplies by kv_b_proj's halves inside attention, on kv_a_layernorm's output
ABSORBED_INPUTS = {"kv_b_proj": "kv_a_layernorm"}


@contextlib.contextmanager
def capture_inputs(block: nn.Module, names: set[str] | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the input of every linear layer of `block` (those in `names`, module paths relative to the block)
    while the context is open: name -> list of [n, in] tensors, one per call (an expert's: the tokens routed to it)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    modules = dict(block.named_modules())
    for name, m in modules.items():
        if isinstance(m, LinearBase) and (names is None or name in names):
            seen[name] = []
            head, _, last = name.rpartition(".")
            source = ABSORBED_INPUTS.get(last)
            if source is not None:
                handles.append(modules[f"{head}.{source}" if head else source].register_forward_hook(
                    lambda mod, args, out, _n=name: seen[_n].append(out.detach().reshape(-1, out.shape[-1]))))
                continue
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _n=name: seen[_n].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def static_input_scale(amax: float) -> torch.Tensor:
    """The FP8 e4m3 per-tensor scale [1] float32 that maps the largest calibration activation to 448."""
    return torch.tensor([max(amax, 1e-12) / FP8_MAX], dtype=torch.float32)


def embed(weight: torch.Tensor, seqs: list[list[int]], dtype: torch.dtype) -> CalibState:
    """The calibration state entering the first layer: each token's embedding."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    if ids.max().item() >= weight.shape[0]:
        raise ValueError(f"calibration token id {ids.max().item()} is outside the vocabulary ({weight.shape[0]})")
    return CalibState(torch.nn.functional.embedding(ids, weight).to(dtype), seqs)
