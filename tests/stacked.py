"""A tiny model of repeated blocks, for forms that share tensors across layers of one module type
(RaSA, DenseLoRA, RandLoRA): layers.<i>.q (12 -> 12), layers.<i>.up (12 -> 20), layers.<i>.down (20 -> 12)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import lorazoo

BLOCKS = 3
TARGETS = ["q", "up", "down"]
SHAPES = {"q": (12, 12), "up": (12, 20), "down": (20, 12)}  # (in, out)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.up, self.down = nn.Linear(12, 12), nn.Linear(12, 20), nn.Linear(20, 12)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(torch.tanh(self.q(x)))))


class Stacked(nn.Module):
    def __init__(self, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList([Block() for _ in range(BLOCKS)])
        self.head = nn.Linear(12, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.to(dtype)

    def forward(self, x, labels=None):
        for block in self.layers:
            x = block(x)
        logits = self.head(x)
        return SimpleNamespace(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


def stacked(form: str, rank: int = 4, **kw):
    """Stacked() with an adapter of ``form`` on every q, up and down; returns (model, handle)."""
    model = Stacked()
    spec = lorazoo.AdapterSpec(form=form, rank=rank, targets=TARGETS, **kw)
    return model, lorazoo.adapt(model, spec)


def form_at(model, path: str, name: str = "default"):
    return model.get_submodule(path).adapters[name].form
