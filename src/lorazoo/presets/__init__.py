"""Named variants: each a preset of parts, with its family and paper (see ../shared/VARIANTS.md).

One file per group of the catalogue, each with a list ``PRESETS`` of rows made by :func:`preset`;
this module collects them in ``GROUPS`` order. To add a variant, add its row to its group's file."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    family: str
    axes: str
    paper: str
    parts: dict = field(default_factory=dict)
    tier: int = 1


def preset(name, method, family, axes, paper, tier=1, **parts) -> Preset:
    """One catalogue row: name, method, family, axes, paper, and the parts and options it sets."""
    return Preset(name, method, family, axes, paper, parts, tier)


GROUPS = ("tier1", "tier2", "tier3_sharing", "tier3_rank", "tier3_experts", "tier3_forms", "tier3_training", "baselines")


def _collect() -> dict[str, Preset]:
    out: dict[str, Preset] = {}
    for group in GROUPS:
        for p in importlib.import_module(f"{__name__}.{group}").PRESETS:
            if p.name in out:
                raise RuntimeError(f"preset {p.name!r} defined twice (again in presets/{group}.py)")
            out[p.name] = p
    return out


PRESETS: dict[str, Preset] = _collect()
