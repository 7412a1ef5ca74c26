"""AdapterSpec: one adapter described along the taxonomy's axes, validated when it is built."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError
from .parts import check_number
from .presets import PRESETS
from .registry import REGISTRIES

_FIELDS = ("form", "init", "scale", "optim", "schedule", "rank", "alpha", "rank_dropout",
           "dropout", "targets", "modules_to_save", "seed")


@dataclass(init=False)
class AdapterSpec:
    """What adapter to put on a model.

    Parts (each a registered name): ``form`` (how ΔW is formed), ``init`` (how it starts; "default"
    is the form's own paper init), ``scale`` (s as a function of alpha and rank), ``optim``
    (parameter groups, gradient transforms), ``schedule`` (step-boundary work, aux losses).
    ``rank_dropout`` is DropLoRA's Bernoulli mask on the rank dimension (any form with one);
    ``dropout`` is ordinary dropout on the adapter's input. ``targets`` is a list of module names
    or name suffixes, a regular expression, or "all-linear" (every linear layer but the output
    head). Any option a chosen part declares may be passed as a keyword (``loraplus_ratio=16``).
    """

    form: str
    init: str
    scale: str
    optim: str
    schedule: str
    rank: int
    alpha: float
    rank_dropout: float
    dropout: float
    targets: Any
    modules_to_save: list
    seed: int
    options: dict = field(default_factory=dict)

    def __init__(self, form: str = "lora", init: str = "default", scale: str = "lora",
                 optim: str = "default", schedule: str = "none", rank: int = 8, alpha: float = 16,
                 rank_dropout: float = 0.0, dropout: float = 0.0, targets: Any = "all-linear",
                 modules_to_save: list | tuple = (), seed: int = 0, **part_options: Any):
        self.form, self.init, self.scale, self.optim, self.schedule = form, init, scale, optim, schedule
        self.rank, self.alpha, self.rank_dropout, self.dropout = rank, alpha, rank_dropout, dropout
        self.targets = list(targets) if isinstance(targets, (list, tuple)) else targets
        if not isinstance(modules_to_save, (list, tuple)):
            raise SpecError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
        self.modules_to_save = list(modules_to_save)
        self.seed = seed
        self.options = {}
        self._validate(part_options)

    # --- validation -------------------------------------------------------------------------
    def part_classes(self) -> dict[str, Any]:
        return {axis: REGISTRIES[axis].get(getattr(self, axis)).obj for axis in REGISTRIES}

    def _validate(self, given: dict[str, Any]) -> None:
        parts = self.part_classes()  # raises on unknown names
        check_number("rank", self.rank, minimum=1, integer=True)
        self.rank = int(self.rank)
        check_number("alpha", self.alpha, strict=True)
        check_number("rank_dropout", self.rank_dropout, maximum=0.999)
        check_number("dropout", self.dropout, maximum=0.999)
        check_number("seed", self.seed, integer=True, maximum=2**64 - 1)  # torch.manual_seed's range
        _check_targets(self.targets)
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise SpecError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

        declared: dict[str, Any] = {}
        for axis, cls in parts.items():
            for key, default in getattr(cls, "options", {}).items():
                declared.setdefault(key, default)
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise SpecError(
                f"unknown option(s) {', '.join(unknown)} for parts "
                f"{', '.join(f'{a}={getattr(self, a)}' for a in parts)}; "
                f"options these parts accept: {', '.join(sorted(declared)) or 'none'}"
            )
        self.options = {**declared, **given}
        for axis, cls in parts.items():
            if hasattr(cls, "validate"):
                cls.validate(self.options)

        form_cls = parts["form"]
        for axis in ("init", "optim", "schedule"):
            if hasattr(parts[axis], "check_form"):
                parts[axis].check_form(form_cls)
        for cls in parts.values():
            if hasattr(cls, "check_spec"):
                cls.check_spec(self)
        if self.rank_dropout > 0 and not form_cls.has_rank:
            raise SpecError(
                f"rank_dropout needs a form with a rank dimension; form '{self.form}' has none "
                f"(set rank_dropout=0)"
            )

    # --- presets and (de)serialization --------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AdapterSpec":
        """The spec of a named variant from the catalogue, with any field or option overridden."""
        if not isinstance(name, str) or name not in PRESETS:
            raise SpecError(f"unknown variant {name!r}; known variants: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name].parts, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _FIELDS}
        d.update(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterSpec":
        return cls(**d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AdapterSpec) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"AdapterSpec({inner})"


def _check_targets(targets: Any) -> None:
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as e:
                raise SpecError(f"targets {targets!r} is not a valid regular expression: {e}") from None
        return
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        return
    raise SpecError(
        f"targets must be a non-empty list of module names, a regular expression, or 'all-linear'; "
        f"got {targets!r}"
    )
