"""Training-loss curves: the normalized area under the curve (LoRMA paper, Sec. 5.2, Table 5).

LoRMA measures convergence speed by the area under the training-loss curve (lower: faster) and
reports the % decrease against LoRA. Here the steps are rescaled to [0, 1] and the area taken with
trapezoids, so the AUC is the curve's mean level: a constant curve c has AUC c, and runs of
different lengths compare. The study report (lorazoo.study.report) uses this same function.
"""
from __future__ import annotations

import math


def loss_auc(losses: list[float] | None) -> float:
    """Area under the loss curve with steps rescaled to [0, 1] (trapezoids): the mean training
    loss, comparable between runs of different lengths. NaN when there are no finite losses
    (non-finite and missing entries are skipped); a single loss is its own AUC."""
    ys = [float(y) for y in (losses or []) if y is not None and math.isfinite(float(y))]
    if not ys:
        return math.nan
    if len(ys) == 1:
        return ys[0]
    return sum((a + b) / 2 for a, b in zip(ys, ys[1:])) / (len(ys) - 1)


def auc_reduction(auc: float, reference: float) -> float:
    """% AUC decrease of a run against a reference run (LoRMA's Table 5, against LoRA):
    100·(reference − auc)/reference; positive when the run converges faster."""
    if not (math.isfinite(auc) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return 100.0 * (reference - auc) / reference
