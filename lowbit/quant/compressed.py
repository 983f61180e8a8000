"""Reading a compressed-tensors `quantization_config` (what `lowbit quantize` and llm-compressor write): which linear
method each layer gets.

Targets are matched as compressed-tensors and vLLM match them: a module name equal to the target, a `re:` regex
matched from the start of the name, or the class name `Linear` for any linear layer; a name or regex match wins
over the class name. lowbit builds merged layers (qkv_proj, gate_up_proj) where the checkpoint has their parts, so
a merged layer is matched through its parts, which must agree.

A `transform_config` (compressed-tensors' transforms, what `--online-hadamard` writes) may ask for an online
Hadamard transform of some layers' inputs: the linear method of such a layer carries an `InputTransform`, which
`LinearBase` applies before the method; transforms at "weight_input"/"weight_output" were folded into the weights
when the checkpoint was written, and need nothing at run time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.config import ConfigError
from lowbit.layers.linear import InputTransform, LinearMethod, UnquantizedLinearMethod
from lowbit.quant.config import QuantConfig
from lowbit.quant.rotation import is_power_of_two
from lowbit.quant.schemes import QuantArgs, Scheme

# lowbit's merged layers -> the checkpoint modules they are made of
MERGED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

FORMATS = ("pack-quantized", "int-quantized", "float-quantized")

# `--online-hadamard`: SpinQuant's name for the rotation of down_proj's input, and the layers it turns (dense and
# shared-expert MLPs; routed experts run in the fused MoE, which applies no transform, in lowbit as in vLLM)
ONLINE_HADAMARD = "R4"
ONLINE_HADAMARD_TARGET = r"re:.*mlp\.(?:shared_experts\.)?down_proj$"
# layers whose input never goes through LinearBase.forward, where input transforms are applied
_PAST_FORWARD = re.compile(r"\.experts\.\d+\.|\.kv_b_proj$")


def split_merged(prefix: str) -> list[str]:
    """`model.layers.0.self_attn.qkv_proj` -> its checkpoint modules (q_proj, k_proj, v_proj); others unchanged."""
    head, _, last = prefix.rpartition(".")
    if last in MERGED_PARTS:
        return [f"{head}.{p}" if head else p for p in MERGED_PARTS[last]]
    return [prefix]


def target_matches(name: str, target: str) -> bool:
    """compressed-tensors' name matching: `re:REGEX` matched from the start of the name, else the exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _args(d: dict | None, where: str) -> QuantArgs | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    try:
        group_size = d.get("group_size")
        strategy = d.get("strategy") or ("tensor" if group_size is None else "channel" if group_size == -1
                                         else "group")
        block = d.get("block_structure")
        return QuantArgs(num_bits=int(d.get("num_bits", 8)), type=str(d.get("type", "int")).lower(),
                         strategy=str(strategy).lower(), symmetric=bool(d.get("symmetric", True)),
                         group_size=group_size if strategy == "group" else None,
                         block_structure=tuple(block) if block else None, dynamic=d.get("dynamic") is True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class ConfigGroup:
    name: str
    targets: list[str]
    weights: QuantArgs
    input_activations: QuantArgs | None
    format: str

    def method(self) -> LinearMethod:
        from lowbit.quant.methods import Fp8BlockLinearMethod, IntLinearMethod, PackedLinearMethod
        w, a = self.weights, self.input_activations
        if self.format == "pack-quantized" and w.type == "int" and w.num_bits in (4, 8):
            return PackedLinearMethod(w, a)
        if self.format == "int-quantized" and w.type == "int" and w.num_bits == 8 and w.symmetric:
            return IntLinearMethod(w, a)
        if self.format == "float-quantized" and w.type == "float" and w.num_bits == 8 and w.strategy == "block":
            return Fp8BlockLinearMethod(w.block_structure, "weight_scale", a)
        raise ConfigError(f"quantization_config.config_groups.{self.name}: {self.format} with weights "
                          f"{w.to_dict()} is not supported")


@dataclass
class TransformGroup:
    """One online input transform of a `transform_config`: a Hadamard matrix of order `block` (None: the layer's
    whole input) applied to the inputs of the linear layers its targets match."""
    name: str
    block: int | None
    targets: list[str]
    ignore: list[str]

    def matches(self, name: str) -> bool:
        return any(t == "Linear" or target_matches(name, t) for t in self.targets) and \
            not any(target_matches(name, i) for i in self.ignore)


def _names(value, where: str) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: expected a list of module names")
    return names


def _transforms(d, where: str = "quantization_config.transform_config") -> list[TransformGroup]:
    """The online input transforms of a compressed-tensors `transform_config` ({} or absent: none)."""
    if not d:
        return []
    if not isinstance(d, dict) or not isinstance(d.get("config_groups"), dict):
        raise ConfigError(f"{where}: expected a mapping with 'config_groups'")
    out = []
    for name, g in d["config_groups"].items():
        gw = f"{where}.config_groups.{name}"
        if not isinstance(g, dict):
            raise ConfigError(f"{gw}: expected a mapping")
        if g.get("type") != "hadamard":
            raise ConfigError(f"{gw}.type: {g.get('type')!r} is not supported (lowbit runs 'hadamard', Sylvester's "
                              f"deterministic matrices)")
        if g.get("randomize"):
            raise ConfigError(f"{gw}.randomize: randomized Hadamard transforms are not supported")
        block = g.get("head_dim")
        if block is not None and not (isinstance(block, int) and is_power_of_two(block)):
            raise ConfigError(f"{gw}.head_dim: {block!r} is not a power of two")
        for i, a in enumerate(g.get("apply") or []):
            aw = f"{gw}.apply[{i}]"
            if not isinstance(a, dict):
                raise ConfigError(f"{aw}: expected a mapping")
            location = a.get("location")
            if location in ("weight_input", "weight_output"):
                continue  # folded into the weights when the checkpoint was written
            if location != "input":
                raise ConfigError(f"{aw}.location: {location!r} transforms are not supported (lowbit runs 'input' "
                                  f"ones; 'weight_input' and 'weight_output' are already in the weights)")
            # (an inverse Sylvester matrix is the matrix itself: it is symmetric and, normalized, orthogonal)
            out.append(TransformGroup(name, block, _names(a.get("targets"), f"{aw}.targets"),
                                      _names(a.get("ignore") or [], f"{aw}.ignore")))
    return out


def online_hadamard_config(block: int) -> dict:
    """The `transform_config` of `lowbit quantize --online-hadamard B`: each targeted down_proj's input turned by a
    block-diagonal Sylvester Hadamard matrix online, its weight by the inverse offline (already folded), as
    compressed-tensors' TransformConfig serializes it."""
    targets = [ONLINE_HADAMARD_TARGET]
    return {"config_groups": {ONLINE_HADAMARD: {
        "type": "hadamard",
        "apply": [{"targets": targets, "location": "input", "inverse": False, "ignore": []},
                  {"targets": targets, "location": "weight_input", "inverse": True, "ignore": []}],
        "randomize": False, "requires_grad": False, "head_dim": block, "precision": "torch.float32"}}}


def online_hadamard_tensor(module: str) -> str:
    """The checkpoint tensor holding the matrix of a transformed module's online Hadamard (compressed-tensors names
    the transform's submodule f"{scheme}_{location}"): model.layers.0.mlp.down_proj.R4_input.weight."""
    return f"{module}.{ONLINE_HADAMARD}_input.weight"


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[ConfigGroup], ignore: list[str], transforms: list[TransformGroup] | None = None):
        self.groups = groups
        self.ignore = ignore
        self.transforms = transforms or []

    @classmethod
    def from_dict(cls, d: dict) -> "CompressedTensorsConfig":
        where = "quantization_config"
        groups_d = d.get("config_groups")
        transforms = _transforms(d.get("transform_config"))
        if not isinstance(groups_d, dict) or not (groups_d or transforms):
            raise ConfigError(f"{where}.config_groups: a compressed-tensors config needs at least one group")
        default_format = d.get("format")
        groups = []
        for name, g in groups_d.items():
            gw = f"{where}.config_groups.{name}"
            if not isinstance(g, dict) or not g.get("targets"):
                raise ConfigError(f"{gw}: needs 'targets'")
            if g.get("output_activations"):
                raise ConfigError(f"{gw}.output_activations: output quantization is not supported")
            fmt = g.get("format") or default_format
            if fmt not in FORMATS:
                raise ConfigError(f"{gw}.format: {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
            weights = _args(g.get("weights"), f"{gw}.weights")
            if weights is None:
                raise ConfigError(f"{gw}.weights: activation-only quantization is not supported")
            group = ConfigGroup(name, list(g["targets"]), weights, _args(g.get("input_activations"),
                                                                        f"{gw}.input_activations"), fmt)
            group.method()  # fail now, naming the group, if lowbit cannot run it
            groups.append(group)
        return cls(groups, list(d.get("ignore") or []), transforms)

    def group_for(self, name: str) -> ConfigGroup | None:
        """The config group of one checkpoint module, or None when it stays unquantized."""
        if any(target_matches(name, p) for p in self.ignore):
            return None
        for g in self.groups:
            if any(t != "Linear" and target_matches(name, t) for t in g.targets):
                return g
        for g in self.groups:
            if "Linear" in g.targets:
                return g
        return None

    def linear_method(self, prefix: str) -> LinearMethod | None:
        parts = split_merged(prefix)
        groups = [self.group_for(p) for p in parts]
        if any(g is not groups[0] for g in groups):
            names = ", ".join(f"{p}: {g.name if g else 'unquantized'}" for p, g in zip(parts, groups, strict=True))
            raise ConfigError(f"quantization_config: the parts of {prefix} are quantized differently ({names}); "
                              f"lowbit runs them as one layer")
        method = None if groups[0] is None else groups[0].method()
        transform = self.input_transform(prefix)
        if transform is not None:
            method = method or UnquantizedLinearMethod()
            method.input_transform = transform
        return method

    def input_transform(self, prefix: str) -> InputTransform | None:
        """The online input transform of one (lowbit) linear layer, or None; merged parts must agree."""
        parts = split_merged(prefix)
        found = []
        for p in parts:
            hits = [t for t in self.transforms if t.matches(p)]
            if len(hits) > 1:
                raise ConfigError(f"quantization_config.transform_config: {p} has two input transforms "
                                  f"({hits[0].name}, {hits[1].name})")
            found.append(InputTransform(hits[0].name, hits[0].block) if hits else None)
        if any(f != found[0] for f in found):
            raise ConfigError(f"quantization_config.transform_config: the parts of {prefix} have different input "
                              f"transforms; lowbit runs them as one layer")
        if found[0] is not None and _PAST_FORWARD.search(prefix):
            raise ConfigError(f"quantization_config.transform_config.config_groups.{found[0].name}: an input "
                              f"transform on {prefix} is not supported (routed experts run in the fused MoE and "
                              f"MLA absorbs kv_b_proj, past the linear layer where lowbit applies it)")
        return found[0]


# ---------------------------------------------------------------------------------------------- writing
def ct_target(pattern: str) -> str:
    """A recipe target (lowbit's matching: `re:` searched anywhere, a plain name matching the name or its trailing
    dotted parts) as compressed-tensors and vLLM match targets (`re:` from the start, a plain name exactly)."""
    if pattern.startswith("re:"):
        regex = pattern[3:]
        return pattern if regex.startswith((".*", "^")) else f"re:.*(?:{regex})"
    return f"re:(?:.*\\.)?{re.escape(pattern)}$"


def build_config(groups: list[tuple[list[str], Scheme]], default: Scheme | None, ignore: list[str],
                 actorder: bool = False, online_hadamard: int | None = None) -> dict:
    """The `quantization_config` of a checkpoint quantized by recipe groups (targets, scheme) tried before the
    default scheme (every other linear layer); `ignore` and groups of the unquantized scheme are left out.
    `online_hadamard`: the block of down_proj's online Hadamard transform (`online_hadamard_config`)."""
    config_groups, formats = {}, set()
    ignored = [ct_target(p) for p in ignore]

    def add(targets, scheme):
        g = scheme.config_group(targets)
        if actorder and scheme.weights.strategy == "group":  # (compressed-tensors defines act-order for groups)
            g["weights"]["actorder"] = "weight"
        config_groups[f"group_{len(config_groups)}"] = g
        formats.add(scheme.format)

    for targets, scheme in groups:
        if scheme.format == "dense":
            ignored += [ct_target(t) for t in targets]
        else:
            add([ct_target(t) for t in targets], scheme)
    if default is not None and default.format != "dense":
        add(["Linear"], default)
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignored,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": online_hadamard_config(online_hadamard) if online_hadamard else {},
    }
