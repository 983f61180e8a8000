"""Each tensor/expert-parallel rank reads only its own part of the checkpoint: its slice of every split tensor, the
replicated ones whole, and none of the routed experts other ranks own.

The bytes are counted where safetensors hands tensors to the loader (a wrapper around `safe_open` that passes every
call through); the rank a model is built for is set in one process through `lowbit.engine.parallel`'s tp/ep rank
and size, which is all that layers consult while they are built and loaded (the collectives only run in forward).
"""
import collections

import pytest
import safetensors
import torch

from lowbit.engine import parallel
from lowbit.models.loader import Checkpoint, build_model, load_weights

REAL_SAFE_OPEN = safetensors.safe_open
# modules split across tensor-parallel ranks (column, row or vocab parallel), and their split parameters
SPLIT = ("q_b_proj", "o_proj", "embed_tokens", "lm_head", "shared_experts", "gate_proj", "up_proj", "down_proj")
SPLIT_PARAMS = (".weight", ".weight_packed", ".weight_scale")


class _CountedSlice:
    def __init__(self, sl, name: str, counts: collections.Counter):
        self.sl, self.name, self.counts = sl, name, counts

    def get_shape(self):
        return self.sl.get_shape()

    def get_dtype(self):
        return self.sl.get_dtype()

    def __getitem__(self, index):
        t = self.sl[index]
        self.counts[self.name] += t.nbytes
        return t


class _CountedFile:
    """safe_open, counting the bytes of every tensor (or slice of one) read, by tensor name."""

    def __init__(self, counts: collections.Counter, *args, **kwargs):
        self.f, self.counts = REAL_SAFE_OPEN(*args, **kwargs), counts

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        t = self.f.get_tensor(name)
        self.counts[name] += t.nbytes
        return t

    def get_slice(self, name):
        return _CountedSlice(self.f.get_slice(name), name, self.counts)


def load_as_rank(path: str, monkeypatch, tp: int = 1, ep: int = 1, rank: int = 0):
    """(model, {tensor name: bytes read}) for `rank` of a world of max(tp, ep) ranks (tensor parallel in blocks of
    tp consecutive ranks, as `init_parallel` groups them)."""
    counts = collections.Counter()
    with monkeypatch.context() as m:
        m.setattr(safetensors, "safe_open", lambda *a, **kw: _CountedFile(counts, *a, **kw))
        m.setattr(parallel, "tp_size", lambda: tp)
        m.setattr(parallel, "tp_rank", lambda: rank % tp)
        m.setattr(parallel, "ep_size", lambda: ep)
        m.setattr(parallel, "ep_rank", lambda: rank % ep)
        ckpt = Checkpoint(path)
        model = build_model(ckpt, ckpt.model_config(), torch.float32, torch.device("cpu"))
        load_weights(model, ckpt, torch.device("cpu"))
    return model, counts


def tensor_bytes(path: str) -> dict[str, int]:
    ckpt = Checkpoint(path)
    return {n: t.nbytes for n, t in ckpt.iter_tensors()}


def held_bytes(model) -> int:
    return sum(p.nbytes for p in model.parameters())  # tied parameters once


@pytest.fixture(scope="module")
def w4a16(tiny_checkpoints, tmp_path_factory):
    from lowbit.cli import main
    out = str(tmp_path_factory.mktemp("w4a16") / "ckpt")
    assert main(["quantize", "--model", tiny_checkpoints["deepseek_v3"][0], "--scheme", "w4a16", "--group-size", "8",
                 "--algo", "rtn", "--output", out, "--quiet"]) == 0
    return out


def test_one_process_reads_every_tensor_once(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["deepseek_v3"][0]
    model, counts = load_as_rank(path, monkeypatch)
    assert dict(counts) == tensor_bytes(path)  # the counter sees every byte the loader reads
    assert sum(counts.values()) == held_bytes(model)


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2), (4, 4), (2, 4)])
@pytest.mark.parametrize("which", ["bf16", "w4a16"])
def test_each_rank_reads_only_its_part(tiny_checkpoints, w4a16, monkeypatch, tp, ep, which):
    path = tiny_checkpoints["deepseek_v3"][0] if which == "bf16" else w4a16
    full = tensor_bytes(path)
    world = max(tp, ep)
    ranks = [load_as_rank(path, monkeypatch, tp, ep, r) for r in range(world)]
    for name, size in full.items():
        got = [counts[name] for _, counts in ranks]
        if ep > 1 and ".mlp.experts." in name:
            assert sorted(got) == [0] * (world - 1) + [size], (name, got)  # its owner alone reads it
        elif tp > 1 and set(SPLIT) & set(name.split(".")) and name.endswith(SPLIT_PARAMS):
            assert got == [size // tp] * world, (name, got)  # split: each rank its slice
        else:
            assert got in ([size] * world, [size // tp] * world), (name, got)  # replicated or split
    if which == "bf16":
        for model, counts in ranks:
            assert sum(counts.values()) == held_bytes(model)  # nothing read is thrown away
