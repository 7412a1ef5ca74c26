"""adapt(model, spec): put a named adapter on a model's target layers and return its handle."""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .conv import ConvAdaptedLayer, conv_shape, is_conv2d
from .errors import SpecError, TargetError
from .fingerprint import fingerprint
from .handle import AdapterHandle, handles_of
from .layer import AdaptedLayer, Adapter, base_weights, set_module
from .parts import BuildContext
from .registry import SCALES
from .spec import AdapterSpec
from .targets import select_targets

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def adapt(model: nn.Module, spec: AdapterSpec, name: str = "default",
          calibration: Iterable | None = None, *, ranks: dict[str, int] | None = None,
          _initialize: bool = True) -> AdapterHandle:
    """Add adapter ``name`` described by ``spec`` to ``model`` and make it the active one.

    ``calibration`` is an iterable of batches (dicts for ``model(**batch)`` whose output has
    ``.loss``) that data-driven inits (LoRA-GA, EVA) read once. Every check runs before the model
    is changed; an error leaves it as it was.
    """
    if not isinstance(spec, AdapterSpec):
        raise SpecError(f"spec must be a lorazoo.AdapterSpec, got {type(spec).__name__}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(f"adapter name must be an identifier like 'default' or 'task-1', got {name!r}")
    if name in handles_of(model):
        raise SpecError(f"model already has an adapter named {name!r}; pick another name or delete it first")

    parts = spec.part_classes()
    form_cls = parts["form"]
    layers = select_targets(model, spec.targets)
    for p in spec.modules_to_save:
        if not any(n == p or n.endswith("." + p) for n, _ in model.named_modules()):
            raise TargetError(f"modules_to_save entry {p!r} names no module of the model")

    init = parts["init"](spec)
    if init.needs_calibration and calibration is None and _initialize:
        raise SpecError(f"init '{spec.init}' is data-driven: pass calibration=<iterable of batches> to adapt()")
    ranks = dict(ranks or {})
    shapes = {p: _shape(m) for p, m in layers.items()}
    _check_ranks(form_cls, spec, shapes, ranks)
    fp = fingerprint(base_weights(layers))
    if _initialize:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            init.prepare(model, {p: (m.base if isinstance(m, AdaptedLayer) else m) for p, m in layers.items()},
                         calibration)
        ranks.update(init.ranks() or {})
        _check_ranks(form_cls, spec, shapes, ranks)

    # --- from here on the model changes; any error undoes every change ------------------------
    flags = {p: p.requires_grad for p in model.parameters()}
    wrapped: list[tuple[str, nn.Module]] = []
    touched: list[AdaptedLayer] = []
    try:
        handle = _attach(model, spec, name, layers, shapes, ranks, fp, init, form_cls, _initialize,
                         wrapped, touched)
    except BaseException:
        for layer in reversed(touched):
            if name in layer.adapters:
                layer.remove(name)  # also undoes a base shift the init made
        for path, mod in reversed(wrapped):
            set_module(model, path, mod)
        handles_of(model).pop(name, None)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    return handle


def _attach(model, spec, name, layers, shapes, ranks, fp, init, form_cls, initialize, wrapped, touched):
    """Wrap the targets, build and initialize the adapter on each; record every change made."""
    for p in model.parameters():
        p.requires_grad_(False)
    max_in = max(s[0] for s in shapes.values())
    max_out = max(s[1] for s in shapes.values())
    ctx = BuildContext(nn.ModuleDict(), name, max_in, max_out, spec.seed, shapes)
    first = None
    scale_fn = SCALES.get(spec.scale).obj
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for path, mod in layers.items():
            if isinstance(mod, AdaptedLayer):
                layer = mod
            else:
                layer = ConvAdaptedLayer(mod) if is_conv2d(mod) else AdaptedLayer(mod)
                set_module(model, path, layer)
                wrapped.append((path, mod))
            r = ranks.get(path, spec.rank)
            weight = layer.linear_weight()
            ctx.path = path  # per-module-type banks (RaSA, DenseLoRA) key on it
            form = form_cls(layer.in_features, layer.out_features, r, scale_fn(spec.alpha, r), spec.options, ctx)
            adapter = Adapter(form, spec.rank_dropout, spec.dropout).to(device=weight.device, dtype=weight.dtype)
            touched.append(layer)
            layer.adapters[name] = adapter
            if first is None:
                first = adapter
            if initialize:
                init.apply(path, adapter, layer, weight)
                form.after_factor_init(weight)  # derived state from the final factors/base (DoRA's m)
    if len(ctx.banks):  # shared tensors live once, in the first layer's adapter
        first.shared = ctx.banks.to(device=weight.device, dtype=weight.dtype)
    handle = AdapterHandle(model, name, spec, fp, {p: ranks.get(p, spec.rank) for p in layers})
    handle.activate()
    return handle


def _shape(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, AdaptedLayer):
        return m.in_features, m.out_features
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if is_conv2d(m):
        return conv_shape(m)  # (in·kh·kw, out): a linear map on patches
    return m.weight.shape[0], m.weight.shape[1]  # Conv1D: (in, out)


def _check_ranks(form_cls, spec, shapes, ranks) -> None:
    for path, (fin, fout) in shapes.items():
        r = ranks.get(path, spec.rank)
        limit = form_cls.rank_limit(fin, fout, spec.options)
        if r > limit:
            raise SpecError(
                f"rank {r} is too large for layer {path!r} ({fin} -> {fout}): form '{spec.form}' allows at "
                f"most {limit}; lower rank or exclude this layer from targets"
            )
