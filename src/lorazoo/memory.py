"""Memory autograd keeps for backward: the activations a method's training step stores.

Counted exactly, from the tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``), each
storage once, the model's own parameters and buffers left out (a frozen linear keeps its weight for the
input gradient; that is the base model, not the step). Unlike peak RSS or a CUDA allocator's peak, it
does not move with caching, threads or the device, so two methods compare on any machine.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch

MB = 1024 * 1024


class SavedBytes:
    """Bytes of the distinct storages saved inside a :func:`count_saved` block (``mb`` in MiB)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages = exclude, {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / MB


@contextmanager
def count_saved(model: torch.nn.Module):
    """Count what autograd saves for backward in the block, ``model``'s parameters and buffers left out."""
    counter = SavedBytes({t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())})
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter


def saved_for_backward_mb(model: torch.nn.Module, step) -> float:
    """Run ``step()`` and return the MiB autograd saved for backward (see :func:`count_saved`)."""
    with count_saved(model) as saved:
        step()
    return saved.mb
