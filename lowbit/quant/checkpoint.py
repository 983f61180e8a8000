"""Checkpoint files for `lowbit quantize`: reading a source one layer's tensors at a time (safetensors, DeepSeek's
native FP8 dequantized in memory, or the GGUF default model), and writing the compressed-tensors output so that it
is never mistaken for a complete checkpoint before it is one.

An output folder being written holds the INCOMPLETE_MARKER (which `Checkpoint` refuses) and a work folder:
`job.json` (what is being made: a rerun must ask for the same), `done/NNNNN.json` per finished unit (its tensor
names and report), `state/NNNNN.safetensors` (the calibration state after a unit, for resuming). Each shard and
record is written to a temporary name and renamed, so a kill leaves either the whole file or none; config.json is
written last, then the marker and the work folder go.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.config import ConfigError
from lowbit.models.loader import INCOMPLETE_MARKER, Checkpoint, CheckpointError
from lowbit.quant.methods import fp8_block_dequant

WORK_DIR = ".lowbit-work"
REPORT_FILE = "quantization_report.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_bytes(d) -> bytes:
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written atomically (to a temporary name, then renamed)."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files owner-only; give them the usual permissions
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the source
class SourceReader:
    """A source checkpoint seen as plain float tensors under Hugging Face names, read a few at a time.

    DeepSeek's native FP8 (`quant_method: fp8`, `weight` float8 + `weight_scale_inv` per 128x128 block) is
    dequantized to bfloat16 as it is read, never written out as a BF16 copy."""

    def __init__(self, path: str):
        self.path = path
        self.ckpt = Checkpoint(path)
        self.config_dict = dict(self.ckpt.config_dict)
        qc = self.config_dict.get("quantization_config") or {}
        self.fp8_block = None
        if qc.get("quant_method") == "fp8":
            self.fp8_block = tuple(qc.get("weight_block_size") or (128, 128))
        elif qc:
            raise ConfigError(f"{path}: already quantized ({qc.get('quant_method')}); quantize a bf16/fp16, "
                              f"fp8 or GGUF checkpoint")
        all_names = self.ckpt.names()
        if not self.ckpt.is_gguf:
            missing = sorted({self.ckpt.file_of(n) for n in all_names if not os.path.exists(self.ckpt.file_of(n))})
            if missing:
                raise CheckpointError(f"{missing[0]}: shard listed in model.safetensors.index.json is missing")
        self._scale_inv = {n for n in all_names if n.endswith(".weight_scale_inv")}
        self._names = [n for n in all_names if n not in self._scale_inv and "rotary_emb.inv_freq" not in n]
        self._gguf = None

    def model_config(self):
        return self.ckpt.model_config()

    def names(self) -> list[str]:
        return list(self._names)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype unquantized tensors are written in: the source's (bfloat16 for an FP8 source)."""
        if self.fp8_block is not None:
            return torch.bfloat16
        name = self.config_dict.get("torch_dtype") or self.config_dict.get("dtype") or "bfloat16"
        return _NAME_DTYPES.get(name, torch.bfloat16)

    def fingerprint(self) -> str:
        """Identifies the source's content cheaply: config, tensor names and file sizes."""
        h = hashlib.sha256(json.dumps(self.config_dict, sort_keys=True).encode())
        files = sorted({self.ckpt.file_of(n) for n in self.ckpt.names()})
        for n in sorted(self.ckpt.names()):
            h.update(n.encode())
        for f in files:
            h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}".encode())
        return h.hexdigest()[:16]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        if self.ckpt.is_gguf:
            if self._gguf is None:
                from lowbit.quant import gguf
                self._gguf = gguf._reader(self.path)  # parsing its metadata takes seconds: once
            return _read_gguf(self._gguf, self.config_dict, set(names))
        wanted = names + [f"{n}_scale_inv" for n in names if f"{n}_scale_inv" in self._scale_inv]
        raw = dict(self.ckpt.iter_tensors(wanted))
        out = {}
        for n in names:
            t = raw[n]
            if t.dtype == torch.float8_e4m3fn:
                if self.fp8_block is None or f"{n}_scale_inv" not in raw:
                    raise CheckpointError(f"{self.ckpt.file_of(n)}: fp8 tensor {n} has no {n}_scale_inv")
                t = fp8_block_dequant(t, raw[f"{n}_scale_inv"], self.fp8_block).to(torch.bfloat16)
            out[n] = t
        return out


def _read_gguf(reader, config: dict, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Only the wanted tensors of a GGUF file, dequantized (lowbit.quant.gguf's conversion, filtered before the
    dequantization so that reading one layer does not dequantize the whole file)."""
    import numpy as np
    from gguf.quants import dequantize

    from lowbit.quant import gguf
    out = {}
    for t in reader.tensors:
        name = gguf.hf_name(t.name)
        if name not in wanted:
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            w = gguf._unpermute(w, heads)
        out[name] = torch.from_numpy(np.array(w, copy=True))
    return out


# ---------------------------------------------------------------------------------------------- the output
def shard_name(unit: int, num_units: int) -> str:
    return f"model-{unit + 1:05d}-of-{num_units:05d}.safetensors"


class OutputDir:
    """The folder a quantization writes, with what it takes to resume it and to know it is complete."""

    def __init__(self, path: str, job: dict):
        self.path = path
        self.job = job
        self.work = os.path.join(path, WORK_DIR)

    # -------------------------------------------------------------------------------- state of the folder
    def status(self) -> str:
        """'new', 'resume' (same job, unfinished) or 'complete' (same job, finished); anything else raises."""
        p = self.path
        if not os.path.exists(p):
            return "new"
        if not os.path.isdir(p):
            raise ConfigError(f"{p}: exists and is not a folder")
        entries = set(os.listdir(p))
        if not entries:
            return "new"
        if INCOMPLETE_MARKER in entries:
            job_file = os.path.join(self.work, "job.json")
            if not os.path.exists(job_file):
                raise ConfigError(f"{p}: holds an unfinished checkpoint that lowbit quantize did not start; "
                                  f"choose another --output")
            with open(job_file) as f:
                other = json.load(f)
            if other != self.job:
                diff = sorted(k for k in set(other) | set(self.job) if other.get(k) != self.job.get(k))
                raise ConfigError(f"{p}: holds an unfinished quantization with different arguments "
                                  f"({', '.join(diff)}); rerun it as it was, or choose another --output")
            return "resume"
        report = os.path.join(p, REPORT_FILE)
        if os.path.exists(report):
            with open(report) as f:
                if json.load(f).get("job") == self.job:
                    return "complete"
        what = "another model" if "config.json" in entries else "other files"
        raise ConfigError(f"{p}: already holds {what}; choose an empty or new --output folder")

    def start(self) -> None:
        """Claim the folder: marker first, then the job description."""
        os.makedirs(self.path, exist_ok=True)
        marker = os.path.join(self.path, INCOMPLETE_MARKER)
        if not os.path.exists(marker):
            _atomic_write(marker, b"lowbit quantize is writing this folder; run the same command again to finish\n")
        os.makedirs(os.path.join(self.work, "done"), exist_ok=True)
        os.makedirs(os.path.join(self.work, "state"), exist_ok=True)
        job_file = os.path.join(self.work, "job.json")
        if not os.path.exists(job_file):
            _atomic_write(job_file, _json_bytes(self.job))

    # -------------------------------------------------------------------------------- units
    def _record(self, unit: int) -> str:
        return os.path.join(self.work, "done", f"{unit:05d}.json")

    def done(self, unit: int) -> dict | None:
        try:
            with open(self._record(unit)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def write_unit(self, unit: int, num_units: int, tensors: dict[str, torch.Tensor], report: dict) -> None:
        """A finished unit: its shard, then the record that says it is finished."""
        shard = shard_name(unit, num_units)
        save_tensors(os.path.join(self.path, shard), tensors)
        _atomic_write(self._record(unit), _json_bytes({"shard": shard, "tensors": sorted(tensors),
                                                       "report": report}))

    def _state_file(self, unit: int) -> str:
        return os.path.join(self.work, "state", f"{unit:05d}.safetensors")

    def save_state(self, unit: int, hidden: torch.Tensor, seqs: list[list[int]]) -> None:
        """The calibration state after `unit` (hidden states and token ids), for a later run to resume from."""
        save_tensors(self._state_file(unit), {
            "hidden": hidden, "ids": torch.tensor([t for s in seqs for t in s], dtype=torch.long),
            "lens": torch.tensor([len(s) for s in seqs], dtype=torch.long)})

    def load_state(self, unit: int) -> tuple[torch.Tensor, list[list[int]]] | None:
        path = self._state_file(unit)
        if not os.path.exists(path):
            return None
        with safe_open(path, "pt") as f:
            hidden, ids, lens = f.get_tensor("hidden"), f.get_tensor("ids").tolist(), f.get_tensor("lens").tolist()
        seqs, start = [], 0
        for n in lens:
            seqs.append(ids[start:start + n])
            start += n
        return hidden, seqs

    def drop_state(self, unit: int) -> None:
        try:
            os.remove(self._state_file(unit))
        except FileNotFoundError:
            pass

    # -------------------------------------------------------------------------------- merge and finish
    def adopt(self, part: str, units: range) -> int:
        """Move the finished units of another folder (a part written on another machine) into this one."""
        other = OutputDir(part, self.job)
        if other.status() != "resume":
            raise ConfigError(f"{part}: not a part of this quantization")
        moved = 0
        for u in units:
            rec = other.done(u)
            if rec is None or self.done(u) is not None:
                continue
            shutil.copyfile(os.path.join(part, rec["shard"]), os.path.join(self.path, rec["shard"] + ".part"))
            os.replace(os.path.join(self.path, rec["shard"] + ".part"), os.path.join(self.path, rec["shard"]))
            _atomic_write(self._record(u), _json_bytes(rec))
            moved += 1
        return moved

    def finish(self, num_units: int, config: dict, report: dict, tokenizer=None,
               extra_files: Iterable[str] = ()) -> None:
        """Index, tokenizer, report, then config.json last; then the folder stops being incomplete."""
        weight_map, reports = {}, {}
        for u in range(num_units):
            rec = self.done(u)
            for name in rec["tensors"]:
                weight_map[name] = rec["shard"]
            if rec["report"]:
                reports[str(u)] = rec["report"]
        _atomic_write(os.path.join(self.path, "model.safetensors.index.json"),
                      _json_bytes({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}))
        if tokenizer is not None:
            tokenizer.save_pretrained(self.path)
        for f in extra_files:
            shutil.copyfile(f, os.path.join(self.path, os.path.basename(f)))
        _atomic_write(os.path.join(self.path, REPORT_FILE), _json_bytes(dict(report, job=self.job, units=reports)))
        _atomic_write(os.path.join(self.path, "config.json"), _json_bytes(config))
        os.remove(os.path.join(self.path, INCOMPLETE_MARKER))
        shutil.rmtree(self.work, ignore_errors=True)


def module_tensors(path: str, module: str) -> dict[str, torch.Tensor]:
    """One module's tensors of a checkpoint folder under their local names (`weight_packed`, `weight_scale`...)."""
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for name, shard in weight_map.items():
        if name.startswith(module + ".") and "." not in name[len(module) + 1:]:
            with safe_open(os.path.join(path, shard), "pt") as f:
                out[name[len(module) + 1:]] = f.get_tensor(name)
    return out
