"""Reading a compressed-tensors `quantization_config` (what `lowbit quantize` and llm-compressor write): which linear
method each layer gets.

Targets are matched as compressed-tensors and vLLM match them: a module name equal to the target, a `re:` regex
matched from the start of the name, or the class name `Linear` for any linear layer; a name or regex match wins
over the class name. lowbit builds merged layers (qkv_proj, gate_up_proj) where the checkpoint has their parts, so
a merged layer is matched through its parts, which must agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.config import ConfigError
from lowbit.layers.linear import LinearMethod
from lowbit.quant.config import QuantConfig
from lowbit.quant.schemes import QuantArgs, Scheme

# lowbit's merged layers -> the checkpoint modules they are made of
MERGED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

FORMATS = ("pack-quantized", "int-quantized", "float-quantized")


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


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[ConfigGroup], ignore: list[str]):
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_dict(cls, d: dict) -> "CompressedTensorsConfig":
        where = "quantization_config"
        groups_d = d.get("config_groups")
        if not isinstance(groups_d, dict) or not groups_d:
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
        return cls(groups, list(d.get("ignore") or []))

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
        return None if groups[0] is None else groups[0].method()


# ---------------------------------------------------------------------------------------------- writing
def ct_target(pattern: str) -> str:
    """A recipe target (lowbit's matching: `re:` searched anywhere, a plain name matching the name or its trailing
    dotted parts) as compressed-tensors and vLLM match targets (`re:` from the start, a plain name exactly)."""
    if pattern.startswith("re:"):
        regex = pattern[3:]
        return pattern if regex.startswith((".*", "^")) else f"re:.*(?:{regex})"
    return f"re:(?:.*\\.)?{re.escape(pattern)}$"


def build_config(groups: list[tuple[list[str], Scheme]], default: Scheme | None, ignore: list[str],
                 actorder: bool = False) -> dict:
    """The `quantization_config` of a checkpoint quantized by recipe groups (targets, scheme) tried before the
    default scheme (every other linear layer); `ignore` and groups of the unquantized scheme are left out."""
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
        "transform_config": {},
    }
