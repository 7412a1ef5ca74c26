"""Verdicts on a paper's claim and the statistics behind them, shared by :mod:`.findings` (claims
about trial metrics) and :mod:`.findings_weights` (claims about kept adapters).

A cell is one configuration over its seeds, given as (mean, sd, seeds); two cells differ when
their difference exceeds ``Z`` pooled standard errors, and comparisons need ``MIN_SEEDS`` seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .summary import _mean, _sd

HOLDS, FAILS, UNTESTABLE, NOT_RUN = "holds", "does not hold", "not testable here", "not run"
Z = 2.0          # a difference counts when it exceeds Z pooled standard errors
MIN_SEEDS = 2    # seeds a cell needs before its spread is known


@dataclass
class Verdict:
    verdict: str   # HOLDS, FAILS, UNTESTABLE or NOT_RUN
    ours: str      # our numbers
    reason: str


def done(trials: list[dict]) -> list[dict]:
    """The finished trials with a finite metric."""
    return [t for t in trials if t.get("status") == "done" and t.get("metric") is not None
            and math.isfinite(float(t["metric"]))]


def stats(ts: list[dict], value: Callable[[dict], float] = lambda t: t["metric"]) -> tuple[float, float, int]:
    """(mean, sd, seeds) of ``value`` over a cell's trials; sd is NaN under two seeds."""
    xs = [float(value(t)) for t in ts]
    xs = [x for x in xs if math.isfinite(x)]
    return _mean(xs), _sd(xs), len(xs)


def diff(a: tuple, b: tuple) -> tuple[float, float]:
    """(mean_a - mean_b, pooled standard error) of two cells' stats; SE NaN if either has < MIN_SEEDS."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < MIN_SEEDS or nb < MIN_SEEDS:
        return ma - mb, math.nan
    return ma - mb, math.sqrt(sa ** 2 / na + sb ** 2 / nb)


def fmt(s: tuple) -> str:
    m, sd, n = s
    return f"{m:.3f}" + (f" ± {sd:.3f}" if math.isfinite(sd) else "") + f" (n={n})"


def seed_reason(n: int) -> str:
    return (f"at most {n} seed(s) per cell: the spread over seeds, needed to tell a difference from noise, "
            f"needs {MIN_SEEDS} or more")
