"""Scale parts: the factor s in W0 + s·ΔW, a function of (alpha, rank)."""
from __future__ import annotations

import math

from .registry import SCALES


@SCALES.register("lora", paper="LoRA (Hu et al., 2021)", equations="Eq. 1: s = alpha / r")
def lora_scale(alpha: float, rank: int) -> float:
    return alpha / rank


@SCALES.register("rslora", paper="rsLoRA (Kalajdzievski, 2023) [65]",
                 equations="Eq. 56-61: s = alpha / sqrt(r), rank-stabilized")
def rslora_scale(alpha: float, rank: int) -> float:
    return alpha / math.sqrt(rank)


@SCALES.register("adalora", paper="AdaLoRA (Zhang et al., 2023) [22]",
                 equations="s = alpha / (r + 1e-5), the authors' scaling / (ranknum + 1e-5)")
def adalora_scale(alpha: float, rank: int) -> float:
    """The AdaLoRA authors' code (and PEFT) divide by ranknum + 1e-5: 1 - 1e-5/r of alpha/r."""
    return alpha / (rank + 1e-5)


@SCALES.register("constant", summary="s = alpha, independent of rank")
def constant_scale(alpha: float, rank: int) -> float:
    return float(alpha)
