"""Verdicts on a paper's claim and the statistics behind them, shared by :mod:`.findings` (claims
about trial metrics) and :mod:`.findings_weights` (claims about kept adapters).

A cell is one configuration over its seeds, given as (mean, sd, seeds) (a :class:`Cell` also keeps
its value per seed); two cells differ when their difference exceeds ``Z`` standard errors, and
comparisons need ``MIN_SEEDS`` seeds. Two cells that ran the same seeds are compared seed by seed:
a seed fixes the adapter's and the head's init and the data order in every configuration (common
random numbers), so the SE is that of the per-seed differences (a paired comparison). Otherwise,
or for cells given as plain tuples, it is the pooled SE of two independent means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .summary import _mean, _sd

HOLDS, FAILS, UNTESTABLE, NOT_RUN = "holds", "does not hold", "not testable here", "not run"
Z = 2.0          # a difference counts when it exceeds Z standard errors
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


class Cell(tuple):
    """(mean, sd, seeds) of a cell, with ``by_seed``: seed -> value (empty when seeds are unknown)."""

    def __new__(cls, mean: float, sd: float, n: int, by_seed: dict | None = None):
        cell = super().__new__(cls, (mean, sd, n))
        cell.by_seed = dict(by_seed or {})
        return cell


def stats(ts: list[dict], value: Callable[[dict], float] = lambda t: t["metric"]) -> Cell:
    """(mean, sd, seeds) of ``value`` over a cell's trials; sd is NaN under two seeds."""
    pairs = [((t.get("config") or {}).get("seed"), float(value(t))) for t in ts]
    pairs = [(seed, x) for seed, x in pairs if math.isfinite(x)]
    xs = [x for _, x in pairs]
    by_seed = dict(pairs) if None not in dict(pairs) and len(dict(pairs)) == len(pairs) else {}
    return Cell(_mean(xs), _sd(xs), len(xs), by_seed)


def diff(a: tuple, b: tuple) -> tuple[float, float]:
    """(mean_a - mean_b, its standard error): paired over seeds when both cells ran the same seeds
    (module docstring), else pooled; SE NaN if either has < MIN_SEEDS."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < MIN_SEEDS or nb < MIN_SEEDS:
        return ma - mb, math.nan
    sa_seeds, sb_seeds = getattr(a, "by_seed", {}), getattr(b, "by_seed", {})
    if sa_seeds and sa_seeds.keys() == sb_seeds.keys():
        d = [sa_seeds[k] - sb_seeds[k] for k in sa_seeds]
        return _mean(d), _sd(d) / math.sqrt(len(d))
    return ma - mb, math.sqrt(sa ** 2 / na + sb ** 2 / nb)


def fmt(s: tuple) -> str:
    m, sd, n = s
    return f"{m:.3f}" + (f" ± {sd:.3f}" if math.isfinite(sd) else "") + f" (n={n})"


def seed_reason(n: int) -> str:
    return (f"at most {n} seed(s) per cell: the spread over seeds, needed to tell a difference from noise, "
            f"needs {MIN_SEEDS} or more")
