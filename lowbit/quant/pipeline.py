"""The driver of `lowbit quantize`: streams a checkpoint through layerwise quantization one unit at a time (the
embedding, each decoder layer, each MTP layer, the head), so memory holds one layer however many there are.

No math here (that is layerwise.py and what it calls): this file plans the units, validates everything before
it writes a byte, reads each unit's tensors, hands them over with the calibration state, writes the result, and
makes the run resumable (a rerun skips finished units and restarts from the saved calibration state), splittable
(`parts`/`rank` take contiguous ranges of units; `merge` gathers them) and safe (see checkpoint.py).

Each layer is calibrated on the outputs of the unquantized layers before it, so a unit's result does not depend
on which process made it: any split merges into the same bytes as one run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

import torch
from tqdm import tqdm

from lowbit.config import ConfigError
from lowbit.quant import calibrate, layerwise, rotation
from lowbit.quant.checkpoint import OutputDir, SourceReader
from lowbit.quant.compressed import CompressedTensorsConfig, build_config
from lowbit.quant.layerwise import LinearSpec, QuantOptions
from lowbit.quant.recipe import Recipe

BUILTIN_CALIBRATION = ("calib_gpl2.txt", "calib_apache2.txt")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class Unit:
    """A piece of the checkpoint quantized and written as one shard."""
    index: int
    kind: str  # embed | layer | mtp | head
    layer: int | None  # checkpoint layer index (layer, mtp)
    names: list[str]  # the tensors it writes (read from the source, then quantized)
    reads: list[str] = field(default_factory=list)  # tensors it also reads: an MTP layer's preceding final norm
    specs: list[LinearSpec] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {"embed": "embedding", "head": "head"}.get(self.kind, f"{self.kind} {self.layer}")


@dataclass
class Job:
    source: str
    output: str
    recipe: Recipe
    opts: QuantOptions = field(default_factory=QuantOptions)
    calib_file: str | None = None  # None: the built-in text
    num_calib_tokens: int = 4096
    seq_len: int = 512
    parts: int = 1
    rank: int = 0
    merge: list[str] | None = None  # finish from parts: folders of other machines' parts, or [] for --output

    def __post_init__(self):
        if self.parts < 1 or not 0 <= self.rank < self.parts:
            raise ValueError(f"--rank must be in 0..{self.parts - 1} for --parts {self.parts}, got {self.rank}")
        if self.num_calib_tokens < 16:
            raise ValueError(f"--num-calib-tokens must be at least 16, got {self.num_calib_tokens}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2, got {self.seq_len}")


# ---------------------------------------------------------------------------------------------- planning
def plan_units(reader: SourceReader, cfg, recipe: Recipe) -> list[Unit]:
    """Every unit of the checkpoint with its tensors and linear layers; the source must hold exactly the tensors
    the model needs (MTP layers included when present)."""
    names = set(reader.names())
    present = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    n = cfg.num_hidden_layers
    num_mtp = 0
    while cfg.is_deepseek and n + num_mtp in present:
        num_mtp += 1
    units = [Unit(0, "embed", None, ["model.embed_tokens.weight"])]
    for i in range(n + num_mtp):
        prefix = f"model.layers.{i}"
        layer = layerwise.build_layer(cfg, i, torch.float32, device="meta")
        reads = [] if i < n else ["model.norm.weight" if i == n else f"model.layers.{i - 1}.shared_head.norm.weight"]
        units.append(Unit(len(units), "layer" if i < n else "mtp", i, layerwise.checkpoint_names(layer, prefix),
                          reads, layerwise.linear_specs(layer, prefix, recipe)))
    head = ["model.norm.weight"]
    if "lm_head.weight" in names or not cfg.tie_word_embeddings:
        head.append("lm_head.weight")
    units.append(Unit(len(units), "head", None, head))
    expected = {t for u in units for t in u.names}
    missing = sorted(expected - names, key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{reader.path}: checkpoint is missing tensor {missing[0]}{more}")
    extra = sorted(names - expected, key=_natural)
    if extra:
        raise ConfigError(f"{reader.path}: tensor {extra[0]} has no place in a {cfg.model_type} model of this config")
    return units


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def part_of(units: list[Unit], parts: int, rank: int) -> list[Unit]:
    """Rank `rank`'s contiguous share of the units."""
    n = len(units)
    return units[rank * n // parts:(rank + 1) * n // parts]


def quantization_config(recipe: Recipe, units: list[Unit], opts: QuantOptions) -> dict:
    """The checkpoint's compressed-tensors config, checked to give every linear layer the recipe's scheme when
    read as compressed-tensors and vLLM read it."""
    config = build_config([(g.targets, g.scheme) for g in recipe.groups], recipe.default, recipe.ignore,
                          actorder=opts.actorder and opts.algo == "gptq", online_hadamard=opts.online_hadamard)
    specs = [s for u in units for s in u.specs]
    if not any(s.scheme is not None for s in specs):
        raise ValueError("the recipe quantizes no linear layer of this model")
    reader = CompressedTensorsConfig.from_dict(config)
    by_group = {g.name: s for g, s in zip(reader.groups, [g.scheme for g in recipe.groups if g.scheme.format !=
                                                          "dense"] + [recipe.default], strict=False)}
    for s in specs:
        g = reader.group_for(s.name)
        if (by_group[g.name] if g else None) != s.scheme:
            raise ValueError(f"recipe groups overlap at {s.name}: make their targets disjoint")
    return config


def calibration_text(path: str | None) -> str:
    if path is None:
        return "\n\n".join(resources.files("lowbit").joinpath("data", f).read_text() for f in BUILTIN_CALIBRATION)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such calibration file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def calibration_seqs(tokenizer, job: Job) -> list[list[int]]:
    ids = tokenizer.encode(calibration_text(job.calib_file), add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = calibrate.calibration_sequences(ids, job.num_calib_tokens, job.seq_len - len(bos))
    return [bos + s for s in seqs]


def needs_calibration(units: list[Unit], opts: QuantOptions) -> bool:
    """Only round-to-nearest with dynamic (or no) activation quantization can skip running the model."""
    if opts.algo == "gptq" or opts.smoothquant is not None:
        return True
    return any(s.scheme and s.scheme.input_activations and not s.scheme.input_activations.dynamic
               for u in units for s in u.specs)


# ---------------------------------------------------------------------------------------------- running
class Quantization:
    """One `lowbit quantize` run: everything validated in the constructor, nothing written before `run`."""

    def __init__(self, job: Job, progress: bool = True, log: Callable[[str], None] | None = None):
        self.job, self.progress = job, progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.reader = SourceReader(job.source)
        self.cfg = self.reader.model_config()
        _check_output_path(job.source, job.output)
        self.units = plan_units(self.reader, self.cfg, job.recipe)
        bad = job.recipe.unmatched_targets([s.name for u in self.units for s in u.specs])
        if bad:
            raise ValueError(f"recipe target {bad[0]!r} matches no linear layer of {job.source}")
        self._check_online_hadamard()
        self.qconfig = quantization_config(job.recipe, self.units, job.opts)
        self._check_runtime_layout()
        self.rotation = None
        if job.opts.rotate:
            if self.cfg.is_deepseek:
                raise ValueError("--rotate: rotating the residual stream is implemented for llama, qwen2 and qwen3 "
                                 "models, not for DeepSeek's MLA and MoE layers")
            # the residual stream's rotation and each attention head's (values), fixed by the seed: parts agree
            self.rotation = (rotation.rotation_matrix(self.cfg.hidden_size),
                             rotation.rotation_matrix(self.cfg.head_dim, rotation.SEED + 1))
        from lowbit.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(job.source)
        self.seqs = None
        if needs_calibration(self.units, job.opts):
            if self.tokenizer is None:
                raise ValueError(f"{job.source} has no tokenizer, which calibration needs (GPTQ, SmoothQuant and "
                                 f"static activation scales); use --algo rtn with a dynamic-activation scheme")
            self.seqs = calibration_seqs(self.tokenizer, job)
        # layers run in float32 whatever the source dtype: Hessians and scales from full-precision activations
        self.calib_dtype = torch.float32
        self.out = OutputDir(job.output, self._identity())

    def _check_online_hadamard(self) -> None:
        """--online-hadamard: there is a down_proj to turn (whether its block divides the input, the runtime layout
        check finds); routed experts are left as they are."""
        if self.job.opts.online_hadamard is None:
            return
        if not any(layerwise.online_hadamard_specs(u.specs) for u in self.units):
            raise ValueError(f"--online-hadamard: {self.job.source} has no dense or shared-expert down_proj to turn")
        if any(".mlp.experts." in s.name for u in self.units for s in u.specs):
            self.log("--online-hadamard: the routed experts' down_proj stay unturned (the fused MoE applies no "
                     "input transform, in lowbit as in vLLM); dense and shared-expert down_proj are turned")

    def _check_runtime_layout(self) -> None:
        """Build every layer as the runtime will load the output (on the meta device): a layer the scheme cannot
        lay out (a group size that does not divide its input, FP8 blocks across merged parts) fails now."""
        qc = CompressedTensorsConfig.from_dict(self.qconfig)
        for u in self.units:
            if u.layer is None:
                continue
            try:
                layerwise.build_layer(self.cfg, u.layer, torch.float32, device="meta", quant_config=qc)
            except ValueError as e:
                hint = ""
                plain = layerwise.build_layer(self.cfg, u.layer, torch.float32, "meta")
                if "group size" in str(e):
                    sizes = [m.input_size for m in plain.modules() if hasattr(m, "input_size")]
                    g = math.gcd(*sizes)
                    hint = f"; choose a --group-size that divides every layer's input, e.g. {min(g & -g, 128)}"
                elif "Hadamard block" in str(e):
                    g = math.gcd(*[plain.get_submodule(s.path).input_size
                                   for s in layerwise.online_hadamard_specs(u.specs)])
                    hint = f"; choose an --online-hadamard block that divides it, e.g. {g & -g}"
                raise ValueError(f"{e}{hint}") from None

    def _identity(self) -> dict:
        """What a rerun must ask for again to resume this output."""
        o = self.job.opts
        calib = None
        if self.seqs is not None:
            calib = hashlib.sha256(json.dumps(self.seqs).encode()).hexdigest()[:16]
        return {"source_fingerprint": self.reader.fingerprint(),
                "quantization_config": self.qconfig, "algo": o.algo, "damp": o.damp, "actorder": o.actorder,
                "block_size": o.block_size, "smoothquant": o.smoothquant, "rotate": o.rotate,
                "online_hadamard": o.online_hadamard,
                "calibration_tokens": calib,
                "num_units": len(self.units)}

    # -------------------------------------------------------------------------------- units
    def _state_before(self, unit: Unit) -> calibrate.CalibState:
        """The calibration state entering `unit`: saved by an earlier run, or recomputed by running the unquantized
        units before it (what a part that starts mid-model does)."""
        start = 0
        state = None
        for v in range(unit.index - 1, -1, -1):
            saved = self.out.load_state(v)
            if saved is not None:
                state, start = calibrate.CalibState(*saved), v + 1
                break
        for u in self.units[start:unit.index]:
            state = self._advance(u, self._read(u), state)
        return state

    def _read(self, u: Unit) -> dict:
        """A unit's tensors from the source (those it writes and those it reads), rotated when --rotate asks."""
        if self.rotation is None:
            return self.reader.read(u.names + u.reads)
        q, qh = self.rotation
        if u.kind == "embed":
            return rotation.rotate_embedding(self.reader.read(u.names), q)
        if u.kind == "head":  # a tied head becomes a head of its own: the embedding's rows, turned
            tied = [] if "lm_head.weight" in u.names else ["model.embed_tokens.weight"]
            return rotation.rotate_head(self.reader.read(u.names + tied), q)
        return rotation.rotate_layer(self.reader.read(u.names), f"model.layers.{u.layer}", q, qh,
                                     self.cfg.num_attention_heads, self.cfg.num_key_value_heads)

    def _advance(self, u: Unit, tensors: dict, state) -> calibrate.CalibState | None:
        if u.kind == "embed":
            return calibrate.embed(tensors["model.embed_tokens.weight"], self.seqs, self.calib_dtype)
        if u.kind == "head":
            return None
        layer = self._load_layer(u, tensors)
        return layerwise.advance(layer, state, self.cfg, tensors[u.reads[0]] if u.reads else None)

    def _load_layer(self, u: Unit, tensors: dict):
        layer = layerwise.build_layer(self.cfg, u.layer, self.calib_dtype)
        layerwise.load_layer(layer, f"model.layers.{u.layer}", {n: tensors[n] for n in u.names})
        return layer

    def _quantize_unit(self, u: Unit, state):
        tensors = self._read(u)
        own = {n: t for n, t in tensors.items() if n not in u.reads}
        if u.kind in ("embed", "head"):
            nxt = self._advance(u, tensors, state) if self.seqs is not None else None
            return own, {}, nxt
        layer = self._load_layer(u, tensors) if self.seqs is not None else None  # nothing to run without calibration
        with tqdm(total=sum(s.scheme is not None for s in u.specs), desc=f"  {u.label}", unit="linear",
                  leave=False, disable=not self.progress) as bar:
            out, report, nxt = layerwise.quantize_layer(
                layer, f"model.layers.{u.layer}", own, u.specs, state, self.cfg, self.job.opts,
                tensors[u.reads[0]] if u.reads else None, progress=bar)
        rep = {k: v for k, v in vars(report).items() if v}
        return out, rep, nxt

    # -------------------------------------------------------------------------------- the run
    def run(self, on_unit: Callable[[Unit], None] | None = None) -> dict:
        """Quantize this rank's units (skipping finished ones), and finish the checkpoint when all are done."""
        job, out, units = self.job, self.out, self.units
        status = out.status()
        if status == "complete":
            self.log(f"{job.output}: already complete")
            return {"status": "complete", "output": job.output}
        out.start()
        if job.merge is not None:
            return self._merge()
        mine = part_of(units, job.parts, job.rank)
        todo = [u for u in mine if out.done(u.index) is None]
        state, state_of = None, None
        with tqdm(total=len(mine), initial=len(mine) - len(todo), desc="lowbit quantize", unit="layer",
                  disable=not self.progress) as bar:
            for u in todo:
                bar.set_postfix_str(u.label)
                if self.seqs is not None and state_of != u.index - 1 and u.index > 0:
                    state = self._state_before(u)
                tensors, report, state = self._quantize_unit(u, state)
                state_of = u.index
                out.write_unit(u.index, len(units), tensors, report)
                if state is not None and u.index + 1 < len(units):
                    out.save_state(u.index, state.hidden, state.seqs)
                out.drop_state(u.index - 1)
                del tensors
                bar.update(1)
                if on_unit is not None:
                    on_unit(u)
        if job.parts > 1:
            left = sum(out.done(u.index) is None for u in units)
            self.log(f"part {job.rank} of {job.parts} done ({len(mine)} units); {left} units of other parts left. "
                     f"When all parts are done, run the same command with --merge")
            return {"status": "part", "output": job.output, "units_left": left}
        return self._finish()

    def _merge(self) -> dict:
        for part in self.job.merge:
            if os.path.realpath(part) != os.path.realpath(self.job.output):
                self.out.adopt(part, range(len(self.units)))
        left = [u for u in self.units if self.out.done(u.index) is None]
        if left:
            raise ValueError(f"cannot merge: {len(left)} units are not finished, the first {left[0].label} "
                             f"(run its part again)")
        return self._finish()

    def _finish(self) -> dict:
        uncovered = sorted({re.sub(r"\.(gate|up|down)_proj$", "", n)
                            for u in self.units for n in (self.out.done(u.index)["report"].get("uncovered") or [])},
                           key=_natural)
        if uncovered:
            self.log(f"{len(uncovered)} experts got no calibration tokens and were rounded to nearest "
                     f"(listed in quantization_report.json): {', '.join(uncovered[:8])}"
                     f"{' ...' if len(uncovered) > 8 else ''}")
        config = dict(self.reader.config_dict)
        config.pop("quantization_config", None)
        if self.reader.ckpt.is_gguf:
            config["architectures"] = [_ARCHITECTURES[config["model_type"]]]
            config.setdefault("hidden_act", "silu")
        if self.reader.fp8_block is not None:
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = "bfloat16"
        if self.rotation is not None:
            config["tie_word_embeddings"] = False  # the head was turned with the final norm folded into it
        config["quantization_config"] = self.qconfig
        extra = [os.path.join(self.job.source, "generation_config.json")] if os.path.isdir(self.job.source) else []
        self.out.finish(len(self.units), config, {"uncovered_experts": uncovered}, self.tokenizer,
                        [f for f in extra if os.path.exists(f)])
        self.log(f"{self.job.output}: done")
        return {"status": "done", "output": self.job.output, "uncovered_experts": uncovered}


def _check_output_path(source: str, output: str) -> None:
    src, dst = os.path.realpath(source), os.path.realpath(output)
    if dst == src or dst.startswith(src.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{output}: the output must be outside the source {source}")


def quantize(job: Job, progress: bool = True, on_unit=None) -> dict:
    """Quantize `job.source` into `job.output` (see Quantization)."""
    return Quantization(job, progress).run(on_unit)
