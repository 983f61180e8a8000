"""A recipe maps module names to schemes, so experts can be w4a8 while attention stays fp8-block.

    # recipe.yaml (or the same as JSON)
    default: fp8-block                # scheme of every linear layer no group matches (omit: unquantized)
    ignore: ["lm_head", "re:.*mlp.gate$"]   # never quantized (this list is the default)
    groups:
      - targets: ["re:.*mlp\\.experts\\.\\d+\\..*"]
        scheme: w4a8
        options: {group_size: 128}    # optional: group_size, symmetric, dynamic, act_group_size
    # default: {scheme: w8a8, options: {act_group_size: 32}}   # a default with options

Names are the checkpoint's module names (`model.layers.3.mlp.experts.7.down_proj`); a target is matched as
compressed-tensors matches it (`re:REGEX` searched, else the name or its trailing dotted parts). Groups are tried in
order; the first match wins.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from lowbit.quant.config import matches
from lowbit.quant.schemes import DEFAULT_IGNORE, Scheme, get_scheme


@dataclass
class RecipeGroup:
    targets: list[str]
    scheme: Scheme


@dataclass
class Recipe:
    groups: list[RecipeGroup] = field(default_factory=list)
    default: Scheme | None = None
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    @classmethod
    def from_scheme(cls, name: str, ignore: list[str] | None = None, **options) -> "Recipe":
        """Every linear layer in one scheme (what `lowbit quantize --scheme S` means)."""
        return cls(default=get_scheme(name, **options), ignore=list(DEFAULT_IGNORE if ignore is None else ignore))

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a recipe is a mapping with 'groups', 'default' and 'ignore'")
        unknown = set(d) - {"groups", "default", "ignore"}
        if unknown:
            raise ValueError(f"{source}: unknown recipe keys {sorted(unknown)}")
        groups = []
        for i, g in enumerate(d.get("groups") or []):
            if not isinstance(g, dict) or "targets" not in g or "scheme" not in g:
                raise ValueError(f"{source}: groups[{i}] needs 'targets' and 'scheme'")
            targets = [g["targets"]] if isinstance(g["targets"], str) else list(g["targets"])
            try:
                scheme = get_scheme(g["scheme"], **(g.get("options") or {}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source}: groups[{i}]: {e}") from None
            groups.append(RecipeGroup(targets, scheme))
        default = d.get("default")
        if isinstance(default, dict):
            if set(default) - {"scheme", "options"} or "scheme" not in default:
                raise ValueError(f"{source}: default is a scheme name or {{scheme: NAME, options: {{...}}}}")
            try:
                default = get_scheme(default["scheme"], **(default.get("options") or {}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source}: default: {e}") from None
        elif default:
            default = get_scheme(default)
        else:
            default = None
        ignore = d.get("ignore")
        return cls(groups, default, list(DEFAULT_IGNORE if ignore is None else ignore))

    @classmethod
    def load(cls, path: str) -> "Recipe":
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such recipe file")
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml
            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
        return cls.from_dict(d, source=path)

    def scheme_for(self, module_name: str) -> Scheme | None:
        """The scheme of one linear layer, or None when it stays unquantized."""
        if any(matches(module_name, p) for p in self.ignore):
            return None
        for g in self.groups:
            if any(matches(module_name, t) for t in g.targets):
                return g.scheme
        return self.default

    def unmatched_targets(self, module_names: list[str]) -> list[str]:
        """Targets that match none of the given module names (a recipe typo)."""
        return [t for g in self.groups for t in g.targets if not any(matches(n, t) for n in module_names)]
