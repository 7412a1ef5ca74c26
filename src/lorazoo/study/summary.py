"""A study's trials aggregated: per task, per series (variant and the other axes the grid varies), per
learning rate, the seeds' trials; the best learning rate of each series (mean over seeds). Shared by
the report and the findings."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

from ..analysis.curves import loss_auc
from .grid import STUDY_OPTIONS

FIXED_AXES = ("task", "variant", "lr", "seed")


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def _sd(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def series_label(cfg: dict, extra_axes: list[str]) -> str:
    """A line's name: the variant, plus any other axis the grid varies and this trial sets (``lora
    rank=4``; a trial of another sweep that leaves the axis at its preset's value shows only the variant)."""
    return " ".join([str(cfg["variant"]), *(f"{k}={cfg[k]}" for k in extra_axes if k in cfg)])


def summarize(trials: list[dict]) -> dict:
    """Per task: per series (variant + varying axes): per lr the seeds' metrics, AUCs, curves."""
    done = [t for t in trials if t["status"] == "done"]
    extra: dict[str, list[str]] = {}  # per task: the other axes its trials vary
    for task in {t["config"]["task"] for t in done}:
        mine = [t for t in done if t["config"]["task"] == task]
        keys = {k for t in mine for k in t["config"]} - set(FIXED_AXES) - set(STUDY_OPTIONS)
        extra[task] = sorted(k for k in keys if len({repr(t["config"].get(k)) for t in mine}) > 1)
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for t in done:
        cfg = t["config"]
        out[cfg["task"]][series_label(cfg, extra[cfg["task"]])][float(cfg["lr"])].append(t)
    return {"extra_axes": extra, "tasks": out}


def best_rows(series: dict) -> list[dict]:
    """Best learning rate (highest mean metric over seeds) and its numbers, per series."""
    rows = []
    for name, by_lr in series.items():
        cands = [(lr, _mean([t["metric"] for t in ts])) for lr, ts in by_lr.items()]
        finite = [c for c in cands if math.isfinite(c[1])]
        lr, score = max(finite, key=lambda c: c[1]) if finite else (min(by_lr), math.nan)
        ts = by_lr[lr]
        rows.append({"series": name, "best_lr": lr, "metric": score, "sd": _sd([t["metric"] for t in ts]),
                     "seeds": len(ts), "before": _mean([t["metric_before"] for t in ts]),
                     "auc": _mean([loss_auc(t["losses"]) for t in ts]),
                     "wall": _mean([t["wall_seconds"] for t in ts]),
                     "peak": max((t["peak_rss_mb"] or 0 for t in ts), default=0),
                     "params": ts[0]["trainable_params"]})
    return sorted(rows, key=lambda r: (-r["metric"] if math.isfinite(r["metric"]) else math.inf, r["series"]))
