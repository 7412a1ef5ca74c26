"""adapt(model, spec): put a named adapter on a model's target layers and return its handle."""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .conv import ConvAdaptedLayer, conv_shape, is_conv2d
from .embedding import EmbeddingAdaptedLayer, check_spec as check_embedding_spec, is_embedding, tied_paths
from .errors import SpecError, TargetError
from .fingerprint import fingerprint
from .handle import AdapterHandle, handles_of
from .layer import AdaptedLayer, Adapter, base_weights, set_module
from .parts import BuildContext
from .registry import SCALES
from .saved import SavedModule, share_tied
from .spec import AdapterSpec
from .targets import candidate_layers, select_targets

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
    selected: dict = {}  # base modules trained in place, by path: FT, BitFit, Adapter-H's norms (lorazoo.baselines)
    for cls in parts.values():
        if hasattr(cls, "select_saved"):  # parts (scales are plain functions)
            selected.update(cls.select_saved(model, spec) or {})
    layers = select_targets(model, spec.targets) if form_cls.adapts_layers else {}
    saved, layers = _resolve_saved(model, spec, layers, selected)

    init = parts["init"](spec)
    check_embedding_spec(spec, init, layers)  # embeddings take LoRA and DoRA only (lorazoo.embedding)
    tied = tied_paths(model, layers)
    if init.needs_calibration and calibration is None and _initialize:
        raise SpecError(f"init '{spec.init}' is data-driven: pass calibration=<iterable of batches> to adapt()")
    ranks = dict(ranks or {})
    shapes = {p: _shape(m) for p, m in layers.items()}
    _check_ranks(form_cls, spec, shapes, ranks)
    fp = fingerprint(base_weights(layers or _linears_inside(model, saved)))
    if _initialize:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            init.prepare(model, {p: (m.base if isinstance(m, AdaptedLayer) else m) for p, m in layers.items()},
                         calibration)
        ranks.update(init.ranks() or {})
        decided = init.decided_options()
        if decided:  # recorded in the adapter's spec (a copy), so a load rebuilds the shapes without data
            spec = init.spec = AdapterSpec.from_dict({**spec.to_dict(), **decided})
        _check_ranks(form_cls, spec, shapes, ranks)

    # --- from here on the model changes; any error undoes every change ------------------------
    flags = {p: p.requires_grad for p in model.parameters()}
    wrapped: list[tuple[str, nn.Module]] = []
    touched: list[AdaptedLayer] = []
    try:
        handle = _attach(model, spec, name, layers, saved, shapes, ranks, fp, init, form_cls, _initialize,
                         wrapped, touched, tied, selected)
    except BaseException:
        for layer in reversed(touched):
            if isinstance(layer, SavedModule):
                if name in layer.copies:
                    layer.remove(name)
            elif name in layer.adapters:
                layer.remove(name)  # also undoes a base shift the init made
        for path, mod in reversed(wrapped):
            set_module(model, path, mod)
        handles_of(model).pop(name, None)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    return handle


def _attach(model, spec, name, layers, saved, shapes, ranks, fp, init, form_cls, initialize, wrapped, touched,
            tied=None, selected=None):
    """Wrap the targets, build and initialize the adapter on each, give it its own copy of each
    saved module; record every change made."""
    for p in model.parameters():
        p.requires_grad_(False)
    max_in = max((s[0] for s in shapes.values()), default=0)  # no layers: a parameter selection (FT, BitFit)
    max_out = max((s[1] for s in shapes.values()), default=0)
    ctx = BuildContext(nn.ModuleDict(), name, max_in, max_out, spec.seed, shapes)
    first = None
    scale_fn = SCALES.get(spec.scale).obj
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for path, mod in layers.items():
            if isinstance(mod, AdaptedLayer):
                layer = mod
            else:
                layer = (ConvAdaptedLayer(mod) if is_conv2d(mod) else
                         EmbeddingAdaptedLayer(mod) if is_embedding(mod) else AdaptedLayer(mod))
                set_module(model, path, layer)
                wrapped.append((path, mod))
            layer.tied_with = (tied or {}).get(path, ())  # shared weight: no merge, no base shift
            r = ranks.get(path, spec.rank)
            weight = layer.linear_weight()
            ctx.path = path  # per-module-type banks (RaSA, DenseLoRA) key on it
            form = form_cls(layer.in_features, layer.out_features, r, scale_fn(spec.alpha, r), spec.options, ctx)
            adapter = Adapter(form, spec.rank_dropout, spec.dropout).to(device=weight.device, dtype=weight.dtype)
            adapter.tied_with = layer.tied_with
            touched.append(layer)
            layer.adapters[name] = adapter
            if first is None:
                first = adapter
            if initialize and spec.init == "default" and isinstance(layer, EmbeddingAdaptedLayer):
                layer.default_init(form)  # PEFT's embedding init (lorazoo.embedding)
            if initialize:
                init.apply(path, adapter, layer, weight)
                form.after_factor_init(weight)  # derived state from the final factors/base (DoRA's m)
    if len(ctx.banks):  # shared tensors live once, in the first layer's adapter
        first.shared = ctx.banks.to(device=weight.device, dtype=weight.dtype)
    for path in saved:  # modules_to_save: a copy per adapter, the original kept (lorazoo.saved)
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, SavedModule):
            wrapper = SavedModule(wrapper)
            set_module(model, path, wrapper)
            wrapped.append((path, wrapper.original))
        touched.append(wrapper)
        wrapper.add(name, train=(selected or {}).get(path))
    share_tied([model.get_submodule(p) for p in saved], name)  # a tied head stays tied in the copies (FT)
    handle = AdapterHandle(model, name, spec, fp, {p: ranks.get(p, spec.rank) for p in layers})
    handle.activate()
    return handle


def _inside(a: str, b: str) -> bool:
    """Module path ``a`` is ``b`` or inside it."""
    return a == b or a.startswith(b + ".")


def _resolve_saved(model: nn.Module, spec: AdapterSpec, layers: dict, selected: dict = ()) -> tuple[list[str], dict]:
    """The paths ``spec.modules_to_save`` names, and the targets left beside them.

    A module cannot be both adapted and trained in full (its full copy would replace the adapted
    layer, and both would share the base weight): a saved module that is, contains or sits inside
    a target of this adapter or any adapted layer is refused, naming both. Only the generic
    selections "all-linear" and "all-conv" give way instead, as PEFT does: the layers inside saved
    modules are left out of the targets. A saved module cannot overlap another one either, nor sit
    inside the original or the copies a ``SavedModule`` holds. ``selected`` adds exact module paths the
    spec's parts select (``Part.select_saved``), checked the same way.
    """
    modules = dict(model.named_modules())
    wrappers = [p for p, m in modules.items() if isinstance(m, SavedModule)]
    adapted = [p for p, m in modules.items() if isinstance(m, AdaptedLayer)]
    generic = spec.targets in ("all-linear", "all-conv")
    saved: list[str] = []
    for entry in [*spec.modules_to_save, *selected]:
        found = [n for n in modules if n and (n == entry or (entry not in selected and n.endswith("." + entry)))]
        if not found:
            raise TargetError(f"modules_to_save entry {entry!r} names no module of the model")
        for n in found:
            where = f"modules_to_save entry {entry!r} names {n!r}"
            for w in wrappers:
                if n != w and (_inside(n, w) or _inside(w, n)):
                    raise TargetError(
                        f"{where}, which {'is inside' if _inside(n, w) else 'contains'} {w!r}, a module "
                        f"already saved in full by adapter(s) {', '.join(map(repr, modules[w].copies))}; "
                        f"name {w!r} itself to give this adapter its own copy of it")
            for a in adapted:
                if _inside(n, a) or _inside(a, n):
                    rel = "is" if n == a else ("is inside" if _inside(n, a) else "contains")
                    raise TargetError(
                        f"{where}, which {rel} the adapted layer {a!r} (adapter(s) "
                        f"{', '.join(map(repr, modules[a].adapters))}): a layer cannot be adapted and trained "
                        f"in full at once; remove it from modules_to_save or delete that adapter first")
            for t in list(layers):
                if _inside(t, n) and generic:
                    del layers[t]  # "all-linear" / "all-conv" leave saved modules alone
                elif _inside(t, n) or _inside(n, t):
                    rel = "is" if n == t else ("contains" if _inside(t, n) else "is inside")
                    raise TargetError(
                        f"{where}, which {rel} {t!r}, a target of this adapter: a layer cannot be adapted "
                        f"and trained in full at once; remove it from modules_to_save or from targets")
            for s in saved:
                if s != n and (_inside(n, s) or _inside(s, n)):
                    raise TargetError(f"{where}, which overlaps {s!r}, also in modules_to_save; "
                                      f"keep only one of them")
            if n not in saved:
                saved.append(n)
    if not layers and spec.part_classes()["form"].adapts_layers:
        raise TargetError(f"targets {spec.targets!r} left no layer to adapt: every one is inside modules_to_save "
                          f"{spec.modules_to_save!r}")
    return saved, layers


def _linears_inside(model: nn.Module, saved: list[str]) -> dict[str, nn.Module]:
    """The linear and conv layers inside the saved modules: what fingerprints the base of an adapter that
    adapts no layer (FT, BitFit), so a load onto another model is refused as for any adapter."""
    found = {p: m for p, m in candidate_layers(model).items() if any(_inside(p, s) for s in saved)}
    if not found:
        raise TargetError(f"the modules this adapter trains ({', '.join(saved) or 'none'}) hold no linear or conv layer "
                          f"to fingerprint the base model by")
    return found


def _shape(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, AdaptedLayer):
        return m.in_features, m.out_features
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if is_conv2d(m):
        return conv_shape(m)  # (in·kh·kw, out): a linear map on patches
    if is_embedding(m):
        return m.num_embeddings, m.embedding_dim  # a linear map on one-hot tokens
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
