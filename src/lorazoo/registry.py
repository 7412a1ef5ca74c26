"""Part registries: one per taxonomy axis, each part carrying its paper metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

AXES = ("form", "init", "scale", "optim", "schedule")


@dataclass(frozen=True)
class PartInfo:
    axis: str
    name: str
    obj: Any
    paper: str = ""
    equations: str = ""
    summary: str = ""


@dataclass
class Registry:
    axis: str
    parts: dict[str, PartInfo] = field(default_factory=dict)

    def register(self, name: str, *, paper: str = "", equations: str = "", summary: str = ""):
        def deco(obj):
            if name in self.parts:
                raise RuntimeError(f"{self.axis} '{name}' registered twice")
            self.parts[name] = PartInfo(self.axis, name, obj, paper, equations, summary)
            obj.part_name = name
            return obj

        return deco

    def get(self, name: str) -> PartInfo:
        _load_parts()
        if not isinstance(name, str) or name not in self.parts:
            raise SpecError(
                f"unknown {self.axis} {name!r}; known {self.axis}s: {', '.join(sorted(self.parts))}"
            )
        return self.parts[name]

    def names(self) -> list[str]:
        _load_parts()
        return sorted(self.parts)


FORMS = Registry("form")
INITS = Registry("init")
SCALES = Registry("scale")
OPTIMS = Registry("optim")
SCHEDULES = Registry("schedule")
REGISTRIES = {"form": FORMS, "init": INITS, "scale": SCALES, "optim": OPTIMS, "schedule": SCHEDULES}

_loaded = False


def _load_parts() -> None:
    """Import every module of the part packages once, so their decorators register them."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for pkg_name in ("forms", "inits", "optim", "schedules"):
        pkg = importlib.import_module(f"lorazoo.{pkg_name}")
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"lorazoo.{pkg_name}.{mod.name}")
    importlib.import_module("lorazoo.scales")
