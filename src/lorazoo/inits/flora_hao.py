"""FLoRA's start (Hao et al., 2024 [70]): a random projection A ~ N(0, 1/r), B = 0.

The frozen down-projection of FLoRA (``schedules/flora_hao.py``) is a random Gaussian projection
with entries N(0, 1/r), as the authors' ``stable_randn(...) / sqrt(rank)``: then E[AᵀA] = I, so
decompressing a compressed gradient, G·Aᵀ·A, is unbiased for G (the paper's Sec. 3). B = 0, so the
model starts as the base.

Every draw (this one, count 0, and each resample c = 1, 2, ... of the schedule) comes from its own
CPU generator seeded by the spec's seed, the resample count and the layer's path
(:func:`projection`): every process of a distributed run, a resumed run and a run on another device
draw the same A, whatever the layer order or the global RNG. The draw is float32 (then cast to the
layer's dtype), so float32 and float64 models get the same projections up to the cast.
"""
from __future__ import annotations

import hashlib

import torch

from ..parts import Init
from ..registry import INITS


def projection_seed(seed: int, count: int, path: str) -> int:
    """The generator seed of the layer at ``path`` for resample ``count`` (0: the init)."""
    digest = hashlib.sha256(f"flora_hao/{int(seed)}/{int(count)}/{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def projection(seed: int, count: int, path: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A random projection of ``shape`` (r, in) with entries N(0, 1/r), on ``like``'s device and dtype."""
    g = torch.Generator().manual_seed(projection_seed(seed, count, path))
    a = torch.randn(tuple(shape), generator=g, dtype=torch.float32) / float(shape[0]) ** 0.5
    return a.to(device=like.device, dtype=like.dtype)


@INITS.register("flora_hao", paper="Flora (Hao et al., 2024) [70]",
                equations="study Eq. 71-76 context; A ~ N(0, 1/r) (E[AᵀA] = I), B = 0",
                summary="FLoRA's start: a Gaussian random projection A with entries N(0, 1/r), B zero")
class FloraHaoInit(Init):
    options = {}

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        B, A = adapter.form.factors()
        A.copy_(projection(self.spec.seed, 0, path, A.shape, A))
        B.zero_()
