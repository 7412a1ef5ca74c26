"""Modules trained and saved in full with an adapter (``modules_to_save``): one copy per adapter.

As PEFT's ``ModulesToSaveWrapper`` does, a module named in ``modules_to_save`` is replaced by a
:class:`SavedModule` that keeps the original module untouched (frozen) and, for each adapter that
saves it, a copy made when that adapter is added. The copy is what trains and what the adapter
saves (under the module's own path, ``head.weight``, so the file format does not change).

The forward runs the copy of the active adapter; the original runs when no adapter that saves the
module is active or while that adapter is ``disabled()``. ``delete()`` drops the adapter's copy and,
when no copy is left, puts the original module object back: the model is exactly as it was. Two
adapters that both save one module cannot be active together (``activate`` refuses it, as PEFT
does): only one of their copies could run. Attribute reads that are not the wrapper's own
(``model.head.weight``, ``model.head.in_features``) go to the module that runs now.
"""
from __future__ import annotations

import copy

from torch import nn

_OWN = frozenset({"original", "copies", "active", "disabled", "mixed"})


class SavedModule(nn.Module):
    """The original module plus one trainable copy per adapter that saves it."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None   # the adapter whose copy runs (set by ``activate``)
        self.disabled: set[str] = set()  # adapters inside their ``disabled()`` block

    def add(self, name: str, train=None) -> nn.Module:
        """A fresh copy of the original for adapter ``name`` (frozen until it is activated).

        ``train`` (a predicate over the module's parameter names; None: all) selects the parameters
        the copy trains (BitFit's biases, lorazoo.baselines); the others stay the original's own
        Parameter objects, shared, so they are stored once, never train and are not saved. ``train`` may
        instead have a ``make_copy(original)`` method that builds the copy itself (prefix tuning,
        lorazoo.forms.prefix: a copy sharing every base parameter and adding its own)."""
        make = getattr(train, "make_copy", None)
        dup = copy.deepcopy(self.original) if make is None else make(self.original)
        dup.requires_grad_(False)
        if make is not None:
            train = None
        if train is not None:
            originals = dict(self.original.named_parameters(remove_duplicate=False))
            for key in list(dict(dup.named_parameters(remove_duplicate=False))):
                if not train(key):
                    owner, _, leaf = key.rpartition(".")
                    setattr(dup.get_submodule(owner) if owner else dup, leaf, originals[key])
        self.copies[name] = dup
        return dup

    def own_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters of adapter ``name``'s copy that are its own (not shared with the original):
        the ones it trains and saves."""
        shared = {id(p) for p in self.original.parameters()}
        return [(k, p) for k, p in self.copies[name].named_parameters() if id(p) not in shared]

    def saved_state(self, name: str) -> dict:
        """What adapter ``name`` saves of its copy: its whole state_dict, or only its own parameters when
        it shares the others with the original (``add(train=...)``)."""
        mod = self.copies[name]
        own = self.own_parameters(name)
        if len(own) == len(list(mod.parameters())):
            return mod.state_dict()
        return {k: p for k, p in own}

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None
        self.disabled.discard(name)

    def current(self) -> nn.Module:
        """The module that runs now: the active adapter's copy, else the original."""
        if self.active is not None and self.active not in self.disabled and self.active in self.copies:
            return self.copies[self.active]
        return self.original

    mixed = None  # a lorazoo.mixed.MixedSaved inside mixed_batch(): each adapter's copy on its samples

    def forward(self, *args, **kwargs):
        if self.mixed is not None:
            return self.mixed(*args, **kwargs)
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN or name.startswith("_"):
                raise
            return getattr(self.current(), name)


def share_tied(wrappers: list[SavedModule], name: str) -> None:
    """Keep a weight that several wrapped originals share (a tied embedding and output head) shared in
    adapter ``name``'s copies too: each wrapper's copy is made apart, which would untie it."""
    first: dict[int, nn.Parameter] = {}
    for w in wrappers:
        dup = w.copies[name]
        for key, p in w.original.named_parameters(remove_duplicate=False):
            q = dup.get_parameter(key)
            if id(p) in first and first[id(p)] is not q:
                owner, _, leaf = key.rpartition(".")
                setattr(dup.get_submodule(owner) if owner else dup, leaf, first[id(p)])
            else:
                first.setdefault(id(p), q)


def saved_wrappers(model: nn.Module) -> dict[str, SavedModule]:
    """Every SavedModule in ``model``, by path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, SavedModule)}
