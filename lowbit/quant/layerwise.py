"""Quantizing one decoder layer (or MTP layer) from its tensors and its calibration inputs: run it, capture what each
linear layer reads, optionally smooth, then GPTQ or round each weight into its scheme's compressed-tensors tensors.

No file I/O: the driver (`pipeline.py`) reads the layer's tensors, hands them here with the calibration state, and
writes what comes back. The math is in rtn.py, gptq.py, smoothquant.py and calibrate.py.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.layers.linear import LinearBase
from lowbit.quant import rotation, smoothquant
from lowbit.quant.calibrate import CalibState, capture_inputs, load_module, mtp_inputs, run_layer, \
    static_input_scale
from lowbit.quant.compressed import MERGED_PARTS, ONLINE_HADAMARD_TARGET, online_hadamard_tensor, split_merged, \
    target_matches
from lowbit.quant.config import QuantConfig
from lowbit.quant.formats import compress, dequantize
from lowbit.quant.gptq import gptq_quantize, hessian
from lowbit.quant.methods import activation_quantizer, fake_quant_fp8_static
from lowbit.quant.rtn import rtn_quantize
from lowbit.quant.schemes import Scheme

# checkpoint module -> (lowbit's merged module, shard)
PACKED = {part: (merged, i) for merged, parts in MERGED_PARTS.items() for i, part in enumerate(parts)}
ALGOS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantOptions:
    algo: str = "gptq"
    damp: float = 0.01
    actorder: bool = True  # GPTQ's static act-order (llm-compressor's default too): no runtime cost
    block_size: int = 128
    smoothquant: float | str | None = None  # alpha, or "auto": searched per layer
    rotate: bool = False  # turn the residual stream by a Hadamard rotation folded into the weights (rotation.py)
    online_hadamard: int | None = None  # block of the Hadamard turning down_proj's input online (R4), or None

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"--algo: {self.algo!r} is not one of {', '.join(ALGOS)}")
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp: must be in (0, 1), got {self.damp}")
        sq = self.smoothquant
        if sq is not None and sq != "auto" and not (isinstance(sq, (int, float)) and 0 <= sq <= 1):
            raise ValueError(f"--smoothquant: alpha must be in [0, 1] or auto, got {sq}")
        b = self.online_hadamard
        if b is not None and not (isinstance(b, int) and b >= 2 and rotation.is_power_of_two(b)):
            raise ValueError(f"--online-hadamard: the block must be a power of two (64, 128, ...), got {b}")


@dataclass
class LinearSpec:
    """One checkpoint linear module of a layer and the scheme the recipe gives it."""
    name: str  # checkpoint module name: model.layers.3.mlp.experts.7.gate_proj
    path: str  # the lowbit module (inside the layer) that computes it: mlp.experts.7.gate_up_proj
    scheme: Scheme | None


@dataclass
class LayerReport:
    uncovered: list[str] = field(default_factory=list)  # linears no calibration token reached (rounded to nearest)
    damping: dict[str, float] = field(default_factory=dict)  # linears whose Hessian needed more than --damp


# ---------------------------------------------------------------------------------------------- building
def build_layer(cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device="cpu",
                quant_config: QuantConfig | None = None) -> nn.Module:
    """Layer `layer_idx` of the checkpoint as a lowbit module (unquantized unless a quant_config is given); indices
    past num_hidden_layers are DeepSeek's MTP layers."""
    prefix = f"model.layers.{layer_idx}"
    qc = quant_config or QuantConfig()
    with torch.device(device):
        if cfg.is_deepseek:
            from lowbit.models.deepseek import Block, MTPLayer
            cls = MTPLayer if layer_idx >= cfg.num_hidden_layers else Block
            return cls(cfg, layer_idx, qc, prefix, dtype)
        from lowbit.models.llama import LlamaBlock
        if "rotary" in inspect.signature(LlamaBlock).parameters:  # the model shares one rotary among its layers
            from lowbit.layers.rotary import RotaryEmbedding
            return LlamaBlock(cfg, qc, prefix, dtype, rotary=RotaryEmbedding(cfg.head_dim, cfg.rope_theta,
                                                                             cfg.rope_scaling))
        return LlamaBlock(cfg, qc, prefix, dtype)


def checkpoint_names(layer: nn.Module, prefix: str) -> list[str]:
    """The checkpoint tensor names a layer module is loaded from (merged layers split into their parts)."""
    names = []
    for pname, _ in layer.named_parameters():
        module, _, leaf = pname.rpartition(".")
        names += [f"{m}.{leaf}" for m in split_merged(f"{prefix}.{module}")]
    return names


def linear_specs(layer: nn.Module, prefix: str, recipe) -> list[LinearSpec]:
    """Every checkpoint linear module of a layer with its scheme; merged parts must share one."""
    specs = []
    for path, m in layer.named_modules():
        if not isinstance(m, LinearBase):
            continue
        parts = split_merged(f"{prefix}.{path}")
        schemes = [recipe.scheme_for(p) for p in parts]
        schemes = [None if s is not None and s.format == "dense" else s for s in schemes]  # bf16: unquantized
        if any(s != schemes[0] for s in schemes):
            raise ValueError(f"the recipe quantizes {', '.join(parts)} differently; they run as one layer "
                             f"({path.rpartition('.')[2]}) and need the same scheme")
        specs += [LinearSpec(p, path, s) for p, s in zip(parts, schemes, strict=True)]
    return specs


def online_hadamard_specs(specs: list[LinearSpec]) -> list[LinearSpec]:
    """The linears `--online-hadamard` turns: dense and shared-expert MLPs' down_proj (not routed experts')."""
    return [s for s in specs if target_matches(s.name, ONLINE_HADAMARD_TARGET)]


def load_layer(layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    rel = {n[len(prefix) + 1:]: t for n, t in tensors.items() if n.startswith(prefix + ".")}
    load_module(layer, rel, PACKED)


# ---------------------------------------------------------------------------------------------- running
def advance(layer: nn.Module, state: CalibState, cfg: ModelConfig, prev_norm: torch.Tensor | None = None
            ) -> CalibState:
    """The calibration state after this layer. An MTP layer (prev_norm given: the final norm of the stage before
    it) reads the previous stage's normalized hidden state and the next token of each position."""
    dtype = next(layer.parameters()).dtype
    if prev_norm is None:
        return CalibState(run_layer(layer, state.hidden.to(dtype), state.seq_lens, state.positions()), state.seqs)
    from lowbit.models.deepseek import Block
    st, h = mtp_inputs(state, prev_norm, cfg.rms_norm_eps)
    next_ids = st.ids()

    def forward(positions, hidden):
        x = torch.cat([layer.enorm(layer.embed_tokens(next_ids)), layer.hnorm(hidden)], dim=-1)  # [T, 2D]
        return Block.forward(layer, positions, layer.eh_proj(x))

    return CalibState(run_layer(layer, h.to(dtype), st.seq_lens, st.positions(), forward=forward), st.seqs)


# ---------------------------------------------------------------------------------------------- quantizing
def _act_fake_quant(args) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the runtime does to a layer's input under activation quantization `args`, for inputs x [n, in]; a
    static scale is the one calibration would give these inputs."""
    quant = activation_quantizer(args)
    if args.dynamic:
        return lambda x: quant(None, x)
    return lambda x: fake_quant_fp8_static(x, static_input_scale(x.abs().max().item()))


SEARCH_ROWS = 4096  # inputs a smoothing search judges its candidates on (evenly spaced), at most
SEARCH_LINEARS = 8  # linears of one group it judges (the first by name: MoE experts share a norm), at most


def _smoothing(alpha, x: torch.Tensor, weights: list[torch.Tensor], scheme: Scheme, constrain=None,
               hadamard: int | None = None):
    """One group's factors: SmoothQuant's at a fixed alpha, or the searched ones ("auto"; None when smoothing does
    not lower the group's output error). `hadamard`: the block of an online Hadamard H between the smoothing and
    the quantization (down_proj's R4), which candidates are judged through: the runtime quantizes (x / s) H and
    W s H, and H is its own inverse."""
    if alpha != "auto":
        s = smoothquant.smoothing_factors(x.abs().amax(dim=0).float(), weights, alpha)
        return constrain(s) if constrain is not None else s
    x = x[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], SEARCH_ROWS)).long()]
    quantize_weight = lambda w: dequantize(rtn_quantize(w, scheme.weights, torch.float32))  # noqa: E731
    quantize_act = _act_fake_quant(scheme.input_activations)
    if hadamard is not None:
        def turned(quant):
            return lambda t: rotation.hadamard_blocks(quant(rotation.hadamard_blocks(t, hadamard)), hadamard)
        quantize_act, quantize_weight = turned(quantize_act), turned(quantize_weight)
    s, _, _ = smoothquant.search_factors(x, weights[:SEARCH_LINEARS], quantize_act, quantize_weight,
                                         constrain=constrain)
    return s


def _smooth(tensors: dict[str, torch.Tensor], specs: list[LinearSpec], inputs: dict[str, torch.Tensor],
            prefix: str, alpha, head_dim: int | None = None, hadamard: dict[str, int] | None = None) -> None:
    """SmoothQuant every norm -> linears mapping of this layer whose linears quantize activations, each down_proj
    through its up_proj and (given the head size) each o_proj through its v_proj (in place). `alpha`: a float in
    [0, 1], or "auto" to search the factors of each group. `hadamard`: the linears (checkpoint names) whose input
    the runtime turns by an online Hadamard after the smoothing, and its block."""
    def quantizing(fed):
        return next((s.scheme for s in fed if s.scheme and s.scheme.input_activations), None)

    for norm, pattern in smoothquant.MAPPINGS:
        norm_name = f"{prefix}.{norm}.weight"
        fed = [s for s in specs if pattern.search(s.path)]
        if norm_name not in tensors or quantizing(fed) is None:
            continue
        paths = sorted({s.path for s in fed if s.path in inputs and inputs[s.path].shape[0]})
        if not paths:
            continue
        s = _smoothing(alpha, torch.cat([inputs[p] for p in paths]), [tensors[f"{sp.name}.weight"] for sp in fed],
                       quantizing(fed))
        if s is None:
            continue
        tensors[norm_name] = smoothquant.smooth_norm(tensors[norm_name], s)
        for sp in fed:
            tensors[f"{sp.name}.weight"] = smoothquant.smooth_weight(tensors[f"{sp.name}.weight"], s)
        for name in tensors:
            rel = name[len(prefix) + 1:].rpartition(".")[0]
            if norm in smoothquant.COMPENSATED and smoothquant.COMPENSATED[norm].search(rel) and \
                    name.endswith(".weight"):
                tensors[name] = smoothquant.smooth_weight(tensors[name], s)
        for p in paths:
            inputs[p] = (inputs[p].float() / s).to(inputs[p].dtype)
    for reader, source in smoothquant.THROUGH_ROWS:
        for sp in specs:
            x = inputs.get(sp.path)
            src = f"{sp.name.rpartition('.')[0]}.{source}"
            if not reader.search(sp.name) or quantizing([sp]) is None or x is None or not x.shape[0] or \
                    f"{src}.weight" not in tensors:
                continue
            w = tensors[f"{sp.name}.weight"]
            constrain = rows = None
            if source == "v_proj":  # one factor per kv head's feature, shared by the query heads reading it
                if head_dim is None:
                    continue
                kv = tensors[f"{src}.weight"].shape[0] // head_dim
                constrain = lambda f, kv=kv: smoothquant.share_across_heads(f, kv, head_dim)  # noqa: E731
                rows = lambda f, kv=kv: smoothquant.kv_rows(f, kv, head_dim)  # noqa: E731
            s = _smoothing(alpha, x, [w], sp.scheme, constrain, (hadamard or {}).get(sp.name))
            if s is None:
                continue
            s_rows = rows(s) if rows is not None else s
            for leaf in ("weight", "bias"):
                if f"{src}.{leaf}" in tensors:
                    t = tensors[f"{src}.{leaf}"]
                    tensors[f"{src}.{leaf}"] = smoothquant.smooth_rows(t, s_rows) if t.ndim == 2 else \
                        (t.float() / s_rows).to(t.dtype)
            tensors[f"{sp.name}.weight"] = smoothquant.smooth_weight(w, s)
            inputs[sp.path] = (x.float() / s).to(x.dtype)


def _sibling(name: str) -> str:
    """The same projection of every expert: model.layers.3.mlp.experts.*.down_proj."""
    return re.sub(r"\.experts\.\d+\.", ".experts.*.", name)


def scale_dtype(scheme: Scheme, weight_dtype: torch.dtype) -> torch.dtype:
    """Weight scales as compressed-tensors stores them: float32 for fp8 blocks, else the model's dtype."""
    if scheme.scale_bytes == 4:
        return torch.float32
    return weight_dtype if weight_dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


def quantize_layer(layer: nn.Module | None, prefix: str, tensors: dict[str, torch.Tensor], specs: list[LinearSpec],
                   state: CalibState, cfg: ModelConfig, opts: QuantOptions, prev_norm: torch.Tensor | None = None,
                   progress=None) -> tuple[dict[str, torch.Tensor], LayerReport, CalibState]:
    """Calibrate and quantize one layer (already loaded from `tensors`). Returns the tensors to write (quantized
    linears in compressed-tensors form, everything else as read, smoothed norms included; with
    `opts.online_hadamard`, down_proj as W H and the matrix of its online transform), what to report, and the
    calibration state after this layer (computed by the unquantized layer). With no state (nothing needs
    calibration: round-to-nearest, dynamic activations) the layer is not run at all, and may be None."""
    quantized = [s for s in specs if s.scheme is not None]
    calibrated = state is not None
    next_state = None
    inputs: dict[str, torch.Tensor] = {}
    if calibrated:
        with capture_inputs(layer, {s.path for s in quantized}) as seen:
            next_state = advance(layer, state, cfg, prev_norm)
        dim_of = dict((p, m.in_per_partition) for p, m in layer.named_modules() if isinstance(m, LinearBase))
        inputs = {p: torch.cat(v) if v else torch.zeros(0, dim_of[p]) for p, v in seen.items()}
        del seen
    tensors = dict(tensors)
    turned = {s.name: opts.online_hadamard for s in online_hadamard_specs(specs)} if opts.online_hadamard else {}
    if opts.smoothquant is not None:
        _smooth(tensors, specs, inputs, prefix, opts.smoothquant, None if cfg.is_deepseek else cfg.head_dim, turned)
    for sp in specs:  # the online Hadamard: W H in the checkpoint, x H what GPTQ and the input scales see
        if sp.name in turned:
            b = turned[sp.name]
            tensors[f"{sp.name}.weight"] = rotation.hadamard_blocks(tensors[f"{sp.name}.weight"], b)
            if sp.path in inputs:
                inputs[sp.path] = rotation.hadamard_blocks(inputs[sp.path], b)
            tensors[online_hadamard_tensor(sp.name)] = rotation.hadamard(b).to(torch.float32)

    out = dict(tensors)
    report = LayerReport()
    hessians: dict[str, torch.Tensor] = {}
    act_scales: dict[str, torch.Tensor] = {}
    remaining = {s.path: sum(1 for t in quantized if t.path == s.path) for s in quantized}
    empty = torch.zeros(0, 0)
    for spec in quantized:
        x = inputs.get(spec.path, empty)
        w = out.pop(f"{spec.name}.weight")
        scheme = spec.scheme
        sdtype = scale_dtype(scheme, w.dtype)
        if calibrated and x.shape[0] == 0:
            report.uncovered.append(spec.name)
        if opts.algo == "gptq" and x.shape[0] > 0:
            if spec.path not in hessians:
                hessians[spec.path] = hessian(x)
            stats: dict = {}
            qw = gptq_quantize(w, hessians[spec.path], scheme.weights, sdtype, opts.damp, opts.block_size,
                               opts.actorder, stats)
            if stats["damp"] != opts.damp:
                report.damping[spec.name] = stats["damp"]
        else:
            qw = rtn_quantize(w, scheme.weights, sdtype)
        for local, t in compress(qw, scheme.format).items():
            out[f"{spec.name}.{local}"] = t
        a = scheme.input_activations
        if a is not None and not a.dynamic and x.shape[0] > 0:
            act_scales[spec.name] = static_input_scale(x.abs().max().item())
        remaining[spec.path] -= 1
        if remaining[spec.path] == 0:
            hessians.pop(spec.path, None)
            inputs.pop(spec.path, None)
        if progress is not None:
            progress.update(1)
    for spec in quantized:
        a = spec.scheme.input_activations
        if a is None or a.dynamic:
            continue
        if spec.name not in act_scales:  # an expert no token reached: the largest scale of its siblings
            sib = [v for k, v in act_scales.items() if _sibling(k) == _sibling(spec.name)]
            if not sib:
                raise ValueError(f"{spec.name}: no calibration token reached it or any expert beside it; "
                                 f"use more calibration tokens (--num-calib-tokens)")
            out[f"{spec.name}.input_scale"] = torch.stack(sib).amax(dim=0)
        else:
            out[f"{spec.name}.input_scale"] = act_scales[spec.name]
    return out, report, next_state
