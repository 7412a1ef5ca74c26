"""The catalogue: registered variant presets and what they are."""
from __future__ import annotations

from .errors import SpecError
from .presets import PRESETS
from .registry import REGISTRIES


# Catalogue rows that are options of the base model, not adapter presets: they combine with any preset.
BASE_OPTIONS = {
    "qlora": {"name": "qlora", "method": "QLoRA: 4-bit NF4 frozen base, any adapter on top: "
              "lorazoo.quantize(model, 'nf4') or `lorazoo train --quantize nf4`, then any preset",
              "family": "III-A", "axes": "base quantization", "paper": "[19]", "tier": 2},
}


def variants() -> list[str]:
    """Names of every registered variant preset."""
    return sorted(PRESETS)


def catalogue() -> list[str]:
    """Every catalogue name lorazoo implements: the presets and the base options (QLoRA)."""
    return sorted([*PRESETS, *BASE_OPTIONS])


def describe(name: str) -> dict:
    """Family, axes, paper, equations and parts of a variant preset (or of a single part name)."""
    if name in PRESETS:
        p = PRESETS[name]
        from .spec import AdapterSpec

        spec = AdapterSpec.preset(name)
        parts = {axis: getattr(spec, axis) for axis in REGISTRIES}
        eqs = {axis: REGISTRIES[axis].get(v).equations for axis, v in parts.items()
               if REGISTRIES[axis].get(v).equations}
        return {"name": name, "method": p.method, "family": p.family, "axes": p.axes, "paper": p.paper,
                "tier": p.tier, "parts": parts, "equations": eqs}
    if name in BASE_OPTIONS:
        return dict(BASE_OPTIONS[name])
    for axis, reg in REGISTRIES.items():
        if name in reg.names():
            info = reg.get(name)
            return {"name": name, "axis": axis, "paper": info.paper, "equations": info.equations,
                    "summary": info.summary}
    raise SpecError(f"unknown variant or part {name!r}; variants: {', '.join(variants())}")
