"""AdapterHandle: what training code talks to, one per named adapter on a model."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .distributed import is_main_process, whole
from .errors import LorazooError, NotMergeableError
from .files import write_adapter
from .fingerprint import short
from .qbase import quantization_note
from .layer import Adapter, AdaptedLayer, set_module
from .parts import check_number
from .saved import saved_wrappers
from .spec import AdapterSpec

_HANDLES = "_lorazoo_handles"


def handles_of(model: nn.Module) -> dict[str, "AdapterHandle"]:
    """The adapters on ``model``, by name, in the order they were added."""
    return model.__dict__.setdefault(_HANDLES, {})


class AdapterHandle:
    """A named adapter on a model: training hooks, merge, enable/disable, save, delete.

    Training loop contract::

        opt = torch.optim.AdamW(handle.param_groups(lr))
        loss = model(**batch).loss + handle.aux_loss()
        loss.backward(); handle.before_step(opt); opt.step(); handle.after_step(opt, step)
    """

    def __init__(self, model: nn.Module, name: str, spec: AdapterSpec, fingerprint: dict,
                 ranks: dict[str, int]):
        self.model, self.name, self.spec, self.fingerprint, self.ranks = model, name, spec, fingerprint, ranks
        parts = spec.part_classes()
        self.optim = parts["optim"](spec)
        self.schedule = parts["schedule"](spec)
        handles_of(model)[name] = self
        self.optim.attach(self)  # before adapt's activate() sets requires_grad (LoRA-FA freezes A)
        self.schedule.attach(self)

    # --- structure ------------------------------------------------------------------------
    def layers(self) -> dict[str, AdaptedLayer]:
        """The adapted layers carrying this adapter, by path."""
        self._check_alive()
        return {p: m for p, m in self.model.named_modules()
                if isinstance(m, AdaptedLayer) and self.name in m.adapters}

    def adapters(self) -> dict[str, Adapter]:
        return {p: m.adapters[self.name] for p, m in self.layers().items()}

    def saved_modules(self) -> dict[str, nn.Module]:
        """This adapter's copies of the modules it trains and saves in full (``modules_to_save``),
        by the path of the module they stand for (see lorazoo.saved)."""
        self._check_alive()
        return {p: w.copies[self.name] for p, w in saved_wrappers(self.model).items() if self.name in w.copies}

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, ad in self.adapters().items():
            for k, p in ad.named_parameters():
                if p.requires_grad:
                    yield f"{path}.{k}", p
        seen = set()  # a tied weight two copies share (lorazoo.saved.share_tied) is one parameter
        for path, wrapper in saved_wrappers(self.model).items():
            if self.name in wrapper.copies:  # a copy's own parameters (BitFit shares the rest, lorazoo.baselines)
                for k, p in wrapper.own_parameters(self.name):
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield f"{path}.{k}", p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # --- training hooks -------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups (LoRA+ gives B its own learning rate)."""
        return self.optim.param_groups(self, lr, weight_decay)

    def aux_loss(self) -> torch.Tensor:
        """Auxiliary loss to add to the task loss: the schedule's (AdaLoRA's orthogonality term)
        plus every layer's form term from its last forward (routers' balancing losses); 0 if none."""
        terms = [self.schedule.aux_loss(self)]
        if self.model.training:
            terms += [ad.form.aux_loss() for ad in self.adapters().values()]
        terms = [t for t in terms if t is not None]
        if not terms:
            return torch.zeros((), device=next(iter(self.trainable_parameters()), torch.zeros(())).device)
        return torch.stack([t.reshape(()) for t in terms]).sum() if len(terms) > 1 else terms[0]

    def router_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer with a router (mixture-of-experts forms), each expert's mean gate, mean router
        probability and load over that layer's last forward, for logging (see lorazoo.routing)."""
        from .routing import router_stats

        return router_stats(self)

    def plan(self, total_steps: int) -> None:
        """Tell the schedule how many optimizer steps the run takes (lorazoo's trainer does this).
        AdaLoRA needs it unless its spec sets ``adalora_total_steps``."""
        check_number("total_steps", total_steps, minimum=1, integer=True)
        self.schedule.plan(int(total_steps))

    def before_step(self, optimizer) -> None:
        """Gradient transforms, after backward and before ``optimizer.step()`` (LoRA-Pro).

        The schedule sees the raw gradients first (AdaLoRA's sensitivities), then the optim part.
        """
        self.schedule.before_step(self, optimizer)
        self.optim.before_step(self, optimizer)

    def after_step(self, optimizer, step: int) -> None:
        """Step-boundary work, after ``optimizer.step()`` (AdaLoRA masking, ReLoRA merges)."""
        self.schedule.after_step(self, optimizer, step)

    def lr_factor(self, step: int) -> float:
        """Multiplier on the learning rate at ``step`` (ReLoRA's jagged schedule); 1 otherwise."""
        return self.schedule.lr_factor(step)

    # --- activation, merge ----------------------------------------------------------------
    def activate(self, *others: str) -> None:
        """Make this adapter (and ``others``) the active ones; only active adapters train."""
        activate(self.model, self.name, *others)

    def merge(self, dequantize: bool = False) -> None:
        """Fold this adapter into the base weights (raises for forms that cannot be merged).

        On quantized base layers (QLoRA) a merge is refused, since re-quantizing W + ΔW would round most
        of the update away; ``dequantize=True`` first replaces each quantized base layer by a
        full-precision nn.Linear holding its dequantized weight, then merges into that (lossless from
        there on: unmerge gives the dequantized weight back, not the quantized layer)."""
        layers = self.layers()
        form = self.spec.part_classes()["form"]
        if not form.adapts_layers and not form.mergeable:  # prefix tuning (lorazoo.forms.prefix)
            raise NotMergeableError(f"form '{self.spec.form}' cannot be merged into the base weights (it "
                                    f"lengthens the sequence with trained activations); keep it unmerged")
        if dequantize:
            for p, layer in layers.items():
                if not layer.adapters[self.name].form.mergeable:
                    layer.merge(self.name)  # raises NotMergeableError before any layer is dequantized
            for layer in layers.values():
                layer.dequantize_base()
        for p, layer in layers.items():
            if not layer.adapters[self.name].form.mergeable:
                layer.merge(self.name)  # raises NotMergeableError with the reason, nothing merged yet
        done = []
        try:
            for layer in layers.values():
                layer.merge(self.name)
                done.append(layer)
        except Exception:  # a later layer refused (DoRA's zero gain): merge all or nothing
            for layer in reversed(done):
                layer.unmerge(self.name)
            raise

    def unmerge(self) -> None:
        """Restore the base weights as they were before :meth:`merge` (up to float rounding)."""
        for layer in self.layers().values():
            layer.unmerge(self.name)

    @property
    def merged(self) -> bool:
        return any(self.name in layer.merged for layer in self.layers().values())

    @contextlib.contextmanager
    def disabled(self):
        """Within this block the model computes as if this adapter were not there (its saved
        modules give way to the original modules)."""
        layers = self.layers()
        if self.merged:
            raise LorazooError(f"adapter {self.name!r} is merged; unmerge() it before disabling it")
        wrappers = [w for w in saved_wrappers(self.model).values() if self.name in w.copies]
        for layer in [*layers.values(), *wrappers]:
            layer.disabled.add(self.name)
        try:
            yield self
        finally:
            for layer in [*layers.values(), *wrappers]:
                layer.disabled.discard(self.name)

    # --- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor this adapter owns (parameters, buffers, shared banks, saved modules)."""
        out = {}
        for path, ad in self.adapters().items():
            for k, v in ad.state_dict().items():
                out[f"{path}.{k}"] = v
        seen = set()  # a weight tied across saved copies (lorazoo.saved.share_tied) is saved once
        for path, wrapper in saved_wrappers(self.model).items():
            if self.name in wrapper.copies:
                for k, v in wrapper.saved_state(self.name).items():
                    where = _storage(v)
                    if where is not None and where in seen:
                        continue
                    seen.add(where)
                    out[f"{path}.{k}"] = v
        return out

    def save(self, path, format: str = "lorazoo") -> None:
        """Write ``adapter.safetensors`` and ``adapter_config.json`` into the folder ``path``.

        Under torch.distributed, call it on every rank: the shards are gathered (FSDP) and rank 0
        writes. ``format="peft"`` writes PEFT's ``adapter_model.safetensors`` and ``adapter_config.json``
        instead, for ``PeftModel.from_pretrained`` (see lorazoo.peft_format); a method PEFT does not
        have is refused before anything is written.
        """
        if format == "peft":
            from .peft_format import save_peft

            return save_peft(self, path)
        if format != "lorazoo":
            raise LorazooError(f"format must be 'lorazoo' or 'peft', got {format!r}")
        tensors = {k: whole(v).detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if not is_main_process():  # under torch.distributed rank 0 writes; the others only gathered
            return
        write_adapter(path, tensors, {
            "name": self.name, "spec": self.spec.to_dict(), "targets": sorted(self.ranks), "ranks": self.ranks,
            "base_fingerprint": short(self.fingerprint), "fingerprint": self.fingerprint,
            **quantization_note(self.layers())})

    def delete(self) -> None:
        """Remove this adapter; the base weights are restored (merges and shifts undone) and its
        saved modules give the original modules back."""
        for path, layer in self.layers().items():
            layer.remove(self.name)
            if not layer.adapters:
                set_module(self.model, path, layer.base)
        for path, wrapper in saved_wrappers(self.model).items():
            if self.name in wrapper.copies:
                wrapper.remove(self.name)
                if not len(wrapper.copies):
                    set_module(self.model, path, wrapper.original)
        del handles_of(self.model)[self.name]
        self.model = None

    def merge_and_unload(self, dequantize: bool = False) -> nn.Module:
        """Fold this adapter into the base weights and take lorazoo out of the model: every adapted layer
        becomes its base module again (holding W0 + ΔW), every saved module (``modules_to_save``: a head,
        FT's or BitFit's trained tensors) becomes this adapter's trained copy. The model then computes what
        it computed with the adapter (up to float rounding), has its own module classes and state_dict
        keys, and saves with its own ``save_pretrained`` (deployment; PEFT's ``merge_and_unload``).
        ``dequantize`` as in :meth:`merge`. Refused before any change when another adapter is on the
        model (delete it, or merge_and_unload one adapter at a time) or the form cannot be merged.
        Returns the model; this handle is spent."""
        self._check_alive()
        others = sorted(n for n in handles_of(self.model) if n != self.name)
        if others:
            raise LorazooError(f"merge_and_unload folds one adapter into a model that has no other; this model "
                               f"also has {', '.join(map(repr, others))}: delete those first (or merge_and_unload "
                               f"them one at a time)")
        if not self.merged:
            self.merge(dequantize=dequantize)  # NotMergeableError here leaves everything as it was
        model = self.model
        for path, layer in self.layers().items():
            set_module(model, path, layer.base)  # the merged base: the update stays in its weight
        for path, wrapper in saved_wrappers(model).items():
            if self.name in wrapper.copies:
                set_module(model, path, wrapper.copies[self.name])
        del handles_of(model)[self.name]
        self.model = None
        return model

    def _check_alive(self) -> None:
        if self.model is None:
            raise LorazooError(f"adapter {self.name!r} was deleted")

    def __repr__(self) -> str:
        return (f"AdapterHandle(name={self.name!r}, form={self.spec.form!r}, layers={len(self.ranks)}, "
                f"trainable={self.num_trainable():,})")


def _storage(t: torch.Tensor):
    """Where ``t``'s values live, to tell a tied tensor's second name; None when unknown (sharded, empty)."""
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def activate(model: nn.Module, *names: str) -> None:
    """Make exactly ``names`` the active adapters of ``model``, in this order of application."""
    known = handles_of(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LorazooError(f"no adapter named {', '.join(map(repr, unknown))}; the model has {list(known)}")
    wrappers = saved_wrappers(model)
    for path, w in wrappers.items():
        both = [n for n in names if n in w.copies]
        if len(both) > 1:
            raise LorazooError(f"adapters {', '.join(map(repr, both))} each train their own copy of {path!r} "
                               f"(modules_to_save), so they cannot be active together; activate one of them")
    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            m.active = [n for n in names if n in m.adapters]
            for n, ad in m.adapters.items():
                for p in ad.parameters():  # a form marks a frozen parameter with _lorazoo_frozen
                    p.requires_grad_(n in names and not getattr(p, "_lorazoo_frozen", False))
    for w in wrappers.values():
        w.active = next((n for n in names if n in w.copies), None)
        for n in w.copies:
            for _, p in w.own_parameters(n):  # parameters shared with the original stay frozen
                p.requires_grad_(n in names)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model``."""
    known = handles_of(model)
    if name not in known:
        raise LorazooError(f"no adapter named {name!r}; the model has {list(known)}")
    known[name].delete()
