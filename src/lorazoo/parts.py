"""Base classes of the taxonomy's parts (form, init, optim, schedule).

Each part declares the options it reads in ``options`` (name -> default). The spec accepts any
declared option of its parts as a keyword and refuses every other one, before the model is touched.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch
from torch import nn

from .errors import LorazooError, SpecError


def check_number(name: str, value: Any, *, minimum: float = 0.0, integer: bool = False,
                 strict: bool = False, maximum: float | None = None) -> None:
    """Raise SpecError unless ``value`` is a finite number in range."""
    kind = "an integer" if integer else "a number"
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not whole) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise SpecError(f"{name} must be {kind}, got {value!r}")
    if isinstance(value, int) and abs(value) > 2**1000:  # past float's range: alpha/r would overflow
        raise SpecError(f"{name} is too large for a float ({str(value)[:12]}... has {len(str(abs(value)))} digits)")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise SpecError(f"{name} must be {op} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise SpecError(f"{name} must be <= {maximum}, got {value!r}")


def check_choice(name: str, value: Any, choices) -> None:
    """Raise SpecError unless ``value`` is one of ``choices`` (a dict's keys or a sequence)."""
    if not isinstance(value, str) or value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class Part:
    """Common metadata of a part: declared options with defaults, and validation."""

    part_name: str = ""
    options: dict[str, Any] = {}

    @classmethod
    def validate(cls, opts: dict[str, Any]) -> None:
        """Check this part's options (numbers non-negative by default). Override to refine."""
        for key, default in cls.options.items():
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                check_number(key, opts[key], integer=isinstance(default, int))

    @classmethod
    def check_form(cls, form_cls: type["Form"]) -> None:
        """Raise SpecError when this part cannot work with ``form_cls``."""

    @classmethod
    def check_spec(cls, spec) -> None:
        """Raise SpecError when this part's options conflict with the spec's own fields (rank...)."""

    @classmethod
    def select_saved(cls, model: nn.Module, spec) -> dict | None:
        """Base modules this part trains in place of (or beside) adapted layers: the parameter-selection
        baselines and the layer norms Adapter-H trains (lorazoo.baselines). ``{module path: predicate
        over that module's parameter names saying which train, or None for all}``; ``adapt`` adds the
        paths to ``modules_to_save``. Raise SpecError for a model it cannot handle. Default: None."""
        return None


class Form(nn.Module, Part):
    """How the update is formed from trainable tensors.

    ``forward(x, y, weight, mask)`` gets the (dropped-out) layer input ``x``, the linear output so
    far ``y`` (``W x`` without bias, plus earlier adapters), the frozen weight ``weight`` as
    (out, in), and an optional rank mask of shape (rank,). It returns the new linear output.
    """

    mergeable: bool = True      # the update can be folded into W
    has_rank: bool = True       # rank dropout and rank masks act on a rank dimension
    multiplicative: bool = False  # the update acts on W0 x (LoRMA) rather than on x
    reads_output: bool = False  # forward reads y itself (DoRA rescales it, LoRMA transforms it),
    #                             so y must come without bias; additive forms only add to y
    zero_init: bool = True      # the paper starts from the base model (zero update or identity)
    rank_bound: str = "r"       # rank of the update as a function of r, for docs and tests
    adapts_layers: bool = True  # False: the adapter trains base parameters only (FT, BitFit; lorazoo.baselines)
    fusable: bool = False       # ΔW is formed as an (out, in) matrix each step (forms/dense.py): the layer may
    #                             run x (W0 + ΔW)ᵀ in one matmul through ``fused`` when it runs alone

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float,
                 opts: dict[str, Any], ctx: "BuildContext"):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scale = in_features, out_features, rank, scale

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        """Largest rank this form allows on a layer of this shape."""
        return min(in_features, out_features)

    @classmethod
    def rank_limit(cls, in_features: int, out_features: int, opts: dict[str, Any]) -> int:
        """:meth:`max_rank` for forms whose limit depends on their options (LoKr's factor)."""
        return cls.max_rank(in_features, out_features)

    def reset_parameters(self) -> None:
        """The paper's default initialization."""
        raise NotImplementedError

    def use_bank(self, ctx: "BuildContext", key: str, factory) -> nn.Module:
        """A module shared by every layer of this adapter, owned once by the model (VeRA's A, B).

        It is kept out of this form's own submodules, so state_dict, optimizers and DDP see it once.
        """
        bank = ctx.bank(key, factory)
        object.__setattr__(self, f"_bank_{key}", bank)
        return bank

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Dense update ΔW (out, in) such that the adapted weight is ``weight + ΔW``."""
        raise NotImplementedError

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """Adapted weight W' computed from ``weight``; default W + ΔW."""
        return weight + self.delta_weight(weight)

    def unmerge(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge`; default W' - ΔW."""
        return merged - self.delta_weight(merged)

    def rank_masked(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Apply a rank mask to the rank-dimension activations ``h`` (last dim = rank)."""
        return h if mask is None else h * mask

    # Low-rank factors (B, A) an init may set (PiSSA, EVA...). ``plain_product`` says they make up the
    # whole update s·B·A, so gradient rules (LoRA-Pro) and merges (ReLoRA) may rely on it; MoSLoRA's
    # s·B·M·A does not. Forms without factors return None.
    plain_product: bool = True
    # The forward is exactly LoRA's y + s·B(M ⊙ A x) with A (r, in), B (out, r): conv layers may then
    # run A as a kh x kw conv and B as a 1 x 1 conv (conv.py). LoRA sets it; forms derived from
    # LoRA that change forward or delta do not inherit it.
    plain_lora: bool = False

    def factors(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        return None

    def update_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B', A') with ΔW = B' A', scale included, for per-sample serving (lorazoo.mixed), or None:
        then the dense :meth:`delta_weight` is used. Default: (s·B, A) for plain additive B·A forms."""
        if self.plain_product and not (self.reads_output or self.multiplicative):
            f = self.factors()
            if f is not None:
                return f[0] * self.scale, f[1]
        return None

    def output_gain(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Per-row gain (out,) this form multiplies the layer's output by at inference (DoRA's m/‖V‖),
        for per-sample serving; None (the default) for forms that only add to the output."""
        return None

    def aux_loss(self) -> torch.Tensor | None:
        """This layer's auxiliary loss from its last forward (a router's balancing loss), or None.

        ``handle.aux_loss()`` adds every layer's term to the schedule's; the trainer adds the sum
        to the task loss.
        """
        return None

    def after_factor_init(self, weight: torch.Tensor) -> None:
        """Hook after an init part set the factors and possibly shifted the base (DoRA's magnitude).

        adapt() calls it once per layer right after the init part's ``apply``.
        """


class Init(Part):
    """How trainable tensors (and possibly the frozen base) start.

    ``prepare`` runs once over all targets before adapters exist (calibration statistics, rank
    redistribution); ``apply`` then fills one layer's adapter.
    """

    needs_calibration: bool = False
    needs_factors: bool = True  # needs a form with plain B·A factors
    # The adapted model equals the base model right after this init (on a form whose ``zero_init``
    # holds): a zero update, or a nonzero one moved out of the base (PiSSA). False where the paper
    # starts elsewhere on purpose (NZLoRA's random B·A, LoRA-One's one gradient step).
    starts_as_base: bool = True

    @classmethod
    def check_form(cls, form_cls):
        if cls.needs_factors and form_cls.factors is Form.factors:
            raise SpecError(
                f"init '{cls.part_name}' sets plain B·A factors, which form '{form_cls.part_name}' does not "
                f"have; use it with a factorized form such as 'lora', 'dora' or 'moslora'"
            )

    def __init__(self, spec):
        self.spec = spec

    def prepare(self, model: nn.Module, targets: dict[str, nn.Module], calibration: Iterable | None) -> None:
        """Collect what ``apply`` needs (statistics per target). Default: nothing."""

    def ranks(self) -> dict[str, int] | None:
        """Per-target ranks, when the init redistributes them (EVA)."""
        return None

    def decided_options(self) -> dict[str, Any]:
        """Options this init decided from the data in ``prepare`` (E2LoRA's sharing intervals). ``adapt``
        records them in the adapter's spec (a copy; the caller's spec is left alone), so the forms see
        them and a load rebuilds the same shapes without data. Default: none."""
        return {}

    @classmethod
    def summary(cls, handle: "AdapterHandle") -> dict | None:
        """What the init decided, for the training output when the schedule reports nothing (see
        :meth:`Schedule.summary`), as a JSON-able dict; None (the default) when there is nothing."""
        return None

    def apply(self, path: str, adapter: "Adapter", layer: "AdaptedLayer", weight: torch.Tensor) -> None:
        """Initialize ``adapter`` of ``layer`` (at ``path``; frozen weight ``weight`` as (out, in)).

        An init that changes the frozen base does it through ``adapter.shift_base(weight, B, A)``
        (W0 += B·A, recorded so that save/load and delete reproduce and undo it).
        """


class TrainingState:
    """Checkpointable state of a training-time part (optim, schedule)."""

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint must keep for an exact resume: a flat dict of name -> tensor or
        JSON value (lists, numbers, strings). Stateless parts (the default) return ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the trainer calls it after ``plan``, so the
        restored state wins over the new plan."""


class ValidationBatches:
    """Held-out batches for parts that score or step on a second data split (ALoRA, AutoLoRA,
    BiLoRA), and the model's last training forward as the fallback, recorded by a forward pre-hook
    that :meth:`watch` registers once."""

    validation: list | None = None
    _last = None   # (args, kwargs) of the model's last training forward
    _hook = None

    def set_validation(self, batches) -> None:
        """Batches (dicts of model keyword arguments with labels) for the second split."""
        batches = list(batches)
        if not batches or not all(isinstance(b, dict) for b in batches):
            raise LorazooError("set_validation takes a non-empty list of batch dicts (model keyword arguments)")
        self.validation = batches

    def watch(self, handle) -> None:
        if self._hook is None:
            self._hook = handle.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training:
            self._last = (args, kwargs)


class Optim(Part, TrainingState):
    """Parameter groups and gradient transforms applied before the optimizer step."""

    def __init__(self, spec):
        self.spec = spec

    def attach(self, handle: "AdapterHandle") -> None:
        """Called once when the adapter is built or loaded, with its layers in place and before
        ``activate`` sets ``requires_grad`` (LoRA-FA marks A ``_lorazoo_frozen`` here). Default: nothing."""

    def param_groups(self, handle: "AdapterHandle", lr: float, weight_decay: float) -> list[dict]:
        params = handle.trainable_parameters()
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def before_step(self, handle: "AdapterHandle", optimizer) -> None:
        """Transform gradients in place before ``optimizer.step()``."""


class Schedule(Part, TrainingState):
    """What happens at step boundaries, and auxiliary losses."""

    def __init__(self, spec):
        self.spec = spec

    def attach(self, handle: "AdapterHandle") -> None:
        """Called once when the adapter is built or loaded (see :meth:`Optim.attach`). Default: nothing."""

    def aux_loss(self, handle: "AdapterHandle") -> torch.Tensor | None:
        return None

    def plan(self, total_steps: int) -> None:
        """The run will take ``total_steps`` optimizer steps (AdaLoRA sizes its budget schedule)."""

    def before_step(self, handle: "AdapterHandle", optimizer) -> None:
        """Called after backward and before ``optimizer.step()``, with the raw gradients (AdaLoRA's
        sensitivities), before the optim part transforms them."""

    def after_step(self, handle: "AdapterHandle", optimizer, step: int) -> None:
        """Called after ``optimizer.step()`` with the 1-based number of the step just taken."""

    def lr_factor(self, step: int) -> float:
        """Multiplier on the learning rate at ``step`` (ReLoRA's jagged schedule)."""
        return 1.0

    def summary(self, handle: "AdapterHandle") -> dict | None:
        """What the schedule decided, for the training output (the rank allocators' per-layer ranks),
        as a JSON-able dict; None (the default) when there is nothing to report."""
        return None


class BuildContext:
    """What a form may need beyond its own shape: banks shared by all layers of one adapter.

    The banks are registered once, under the first adapted layer's adapter (``<path>.shared``),
    so ``model.parameters()``, state_dict and DDP see each shared tensor exactly once.

    Banks may be global (VeRA: one per adapter) or per module type (RaSA, DenseLoRA: one per kind
    of layer, ``module_type``); ``adapt`` gives the context every target's shape (``shapes``) and
    sets ``path`` to the target whose form is being built.
    """

    def __init__(self, banks: nn.ModuleDict, adapter_name: str, max_in: int, max_out: int, seed: int,
                 shapes: dict[str, tuple[int, int]] | None = None):
        self.banks, self.adapter_name, self.max_in, self.max_out, self.seed = (
            banks, adapter_name, max_in, max_out, seed)
        self.shapes = dict(shapes or {})  # path -> (in, out) of every target of this adapter
        self.path: str | None = None      # the target being built
        self._types = _module_types(self.shapes)

    def bank(self, key: str, factory) -> nn.Module:
        """The shared module ``key`` of this adapter, built once by ``factory()``."""
        if key not in self.banks:
            self.banks[key] = factory()
        return self.banks[key]

    def module_type(self, path: str | None = None) -> str:
        """The kind of layer at ``path`` (default: the one being built), usable as a bank key: its
        dotted path with block indices (numeric parts) wildcarded, plus its shape, so
        ``layers.3.attn.q_proj`` (4096 -> 1024) is ``layers_N_attn_q_proj_4096x1024``, the same
        for every block. It generalizes RaSA's and DenseLoRA's grouping by name after
        ``layers.<i>.``; layers of one name but different shapes get different types."""
        path = self.path if path is None else path
        if path not in self._types:
            raise KeyError(f"{path!r} is not a target of adapter {self.adapter_name!r}")
        return self._types[path]

    def same_type(self, path: str | None = None) -> list[str]:
        """The targets of the same module type as ``path`` (itself included), in target order."""
        kind = self.module_type(path)
        return [p for p, t in self._types.items() if t == kind]


def _module_types(shapes: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Path -> module type (see :meth:`BuildContext.module_type`), distinct types never colliding."""
    raw = {p: (".".join("*" if part.isdigit() else part for part in p.split(".")), tuple(s))
           for p, s in shapes.items()}
    names: dict[tuple, str] = {}
    for kind in dict.fromkeys(raw.values()):
        pattern, (fin, fout) = kind
        name = re.sub(r"\W", "_", pattern.replace("*", "N")) + f"_{fin}x{fout}"
        while name in names.values():  # two patterns sanitized alike (a.b vs a_b): keep them apart
            name += "_"
        names[kind] = name
    return {p: names[k] for p, k in raw.items()}
