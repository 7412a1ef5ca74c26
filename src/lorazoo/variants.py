"""The catalogue: registered variant presets and what they are."""
from __future__ import annotations

from .errors import SpecError
from .presets import PRESETS
from .registry import REGISTRIES


def variants() -> list[str]:
    """Names of every registered variant preset."""
    return sorted(PRESETS)


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
    for axis, reg in REGISTRIES.items():
        if name in reg.names():
            info = reg.get(name)
            return {"name": name, "axis": axis, "paper": info.paper, "equations": info.equations,
                    "summary": info.summary}
    raise SpecError(f"unknown variant or part {name!r}; variants: {', '.join(variants())}")
