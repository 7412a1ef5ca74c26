"""lorazoo.tune: propose a learning rate for a model, data and variant (``lorazoo tune``).

The unified study's Finding 5, reproduced by the checked-in quick study (docs/study/README.md):
the learning rate matters more than the choice of variant, and one grid step (3-10x) away from a
variant's best rate it often does not learn at all. :func:`propose_lr` turns that into a tool:

1. **Range test** (:func:`range_test`; Smith 2017, "Cyclical learning rates", Sec. 3.3; fastai's
   ``lr_find``). A fresh model and adapter, built exactly as :func:`lorazoo.run.run` builds them
   (same task, spec, seed, data-driven init), trained ``steps`` steps with AdamW on the adapter's
   own parameter groups (so LoRA+ keeps its B/A ratio) at a rate growing exponentially from
   ``lr_min`` to ``lr_max``, one training batch per step (the run's batch size), gradients clipped
   as the Trainer does. The loss is smoothed by a bias-corrected exponential moving average
   (``beta``); the test stops early when the smoothed loss rises above ``(1 + diverge)`` times its
   minimum so far, or when a loss or gradient goes non-finite.
2. **Point estimate**: ``lr_div / DIVERGENCE_FACTOR``, where ``lr_div`` is the edge of stability:
   the first rate at which the smoothed loss rises 5 % (``diverge``) above its minimum so far.
   What was measured (``CALIBRATION``): on the sentiment task the range test's loss barely moves
   below ln 2 before the edge, so the rate of the lowest loss (fastai's "minimum / 10" rule) is
   noise (its ratio to the sweep's best ranged from 0.7 to 8.4 over the variants measured) and
   the steepest descent has no usable slope; the edge is sharp and sits a nearly constant factor
   above the best rate of the full run: over 12 variants of every family (inits, forms,
   optimizers, experts; not the three the test checks), geometric mean 7.0, spread 0.22 decades;
   a 10 % threshold or heavier smoothing spread it to 0.5 decades (a later rise is counted, not
   the first). With the factor, the range test alone lands within one grid step of the sweep's
   best for all 15 variants measured (every variant that learns on sentiment; ReLoRA is LoRA
   here), exactly for 9, the three held-out ones included. When the loss never rises, the estimate
   is ``lr_max / DIVERGENCE_FACTOR`` and counts as a lower bound (its spread is doubled).
   The factor belongs to these settings (``RANGE``) and to runs like the study's (about 100
   steps, 10 % warmup, linear decay); for much longer runs, re-measure it as ``CALIBRATION`` was.
3. **Priors** (:func:`load_priors`, :func:`prior_for`) from stored studies: the study runner's SQLite
   file, a ``trials.csv`` as checked in, or, by default, the quick study shipped inside the package
   (:mod:`lorazoo.tune_priors`, generated from docs/study/trials.csv). Per (task, variant) the best
   rate of a sweep is the rate of its highest metric (ties within ``TIE`` broken by the lower loss
   AUC); sweeps where the variant did not learn (fewer than 3 rates, or a best metric less than
   ``MIN_SPREAD`` above the sweep's median and less than ``MIN_RANGE`` above its worst: a flat
   line at the majority class, as AdaLoRA, VeRA and LoRMA in the quick study) carry no information
   and are skipped. The prior for the asked variant on the asked task is, by what the
   store holds (the first that applies):

   - ``same``: the variant was swept on this task: its best rate, spread ``SD_SAME`` decades;
   - ``ratio``: the variant was swept on other tasks where LoRA was too, and LoRA on this one:
     LoRA's best here times the variant's geometric-mean ratio to LoRA there, ``SD_RATIO``;
   - ``task``: other variants were swept on this task: the median of their best rates, spread
     their standard deviation in decades (at least ``SD_TASK``): in the quick study 13 of the 16
     variants that learn on sentiment peak within one grid step of that median (1e-3);
   - ``variant``: the variant was swept on other tasks only (your own model and data): the mean
     of its best rates there, spread at least ``SD_VARIANT``;
   - none: the range test alone.
4. **Combination**, in log10 of the rate: the range test and the prior are two Gaussian estimates,
   combined by precision (inverse variance) weighting, the posterior mean of a Gaussian prior and
   a Gaussian measurement; the range test's spread ``SD_RANGE`` is the calibration's residual. The
   result never exceeds ``lr_div / SAFETY`` (a rate the range test saw diverge is never proposed,
   whatever the prior says). It is then snapped to the nearest rate of ``grid`` in log space (the
   study's six rates by default), so it can be compared with a sweep.

Everything is returned as a JSON-serializable dict: the proposal, the unsnapped estimates, the
curve (rates, raw and smoothed losses) and how the prior was formed and weighted.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import LorazooError
from .parts import check_number
from .spec import AdapterSpec

STUDY_GRID = (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)   # the quick study's rates (study/suites.py LRS_WIDE)
DEFAULT_PRIOR = "default"        # the quick study shipped in lorazoo.tune_priors

# range test
RANGE = {"lr_min": 1e-5, "lr_max": 1e-1, "steps": 80, "beta": 0.9, "diverge": 0.05, "min_steps": 5}
# Calibration (measured; see the module docstring): the quick study's sentiment task (MiniLM, limit 768,
# batch 8, max_length 48, seed 0), one range test of RANGE's settings per variant: variant ->
# (edge of stability lr_div, best rate of the 96-step 6-rate sweep in docs/study/trials.csv).
# DIVERGENCE_FACTOR and SD_RANGE come from the 12 rows not in CALIBRATION_HELD_OUT (the variants
# tests/test_tune.py checks): geometric mean of lr_div / best 7.03, standard deviation 0.22 decades.
CALIBRATION = {
    "droplora": (0.0138, 1e-3), "eva": (0.00483, 3e-4), "hydralora": (0.0195, 3e-3), "loha": (0.035, 1e-2),
    "lokr": (0.0558, 1e-2), "lora_ga": (0.00106, 1e-4), "lora_pro": (0.00971, 3e-3), "lorma_plus": (0.00971, 1e-3),
    "milora": (0.00864, 1e-3), "moslora": (0.00769, 1e-3), "pissa": (0.00542, 1e-3), "rslora": (0.00429, 1e-3),
}
CALIBRATION_HELD_OUT = {"lora": (0.0195, 1e-3), "dora": (0.0109, 1e-3), "loraplus": (0.000943, 3e-4)}
DIVERGENCE_FACTOR = 7.0   # the proposal is lr_div / DIVERGENCE_FACTOR
SD_RANGE = 0.25           # its spread in decades (0.22 measured, rounded up)
SAFETY = 3.0              # never propose above lr_div / SAFETY
# priors
TIE = 0.005          # metrics closer than this count as tied (broken by loss AUC)
MIN_SPREAD = 0.03    # a sweep whose best metric is less than this above its median ...
MIN_RANGE = 0.1      # ... and whose metric moves less than this across its rates did not learn
SD_SAME, SD_RATIO, SD_TASK, SD_VARIANT = 0.25, 0.5, 0.5, 0.75
PRIOR_KINDS = ("same", "ratio", "task", "variant")


# --- priors -------------------------------------------------------------------------------------
def load_priors(source=DEFAULT_PRIOR) -> list[dict]:
    """Trial records ``{"task", "variant", "lr", "metric", "loss_auc"}`` (finished trials only) from
    a study's SQLite file, a trials.csv (as ``lorazoo report`` writes it), a list of such dicts,
    or ``"default"`` (the quick study shipped with lorazoo). LorazooError for anything else."""
    if source is None:
        return []
    if isinstance(source, (list, tuple)):
        return [_record(r, "priors") for r in source if _done(r)]
    if source == DEFAULT_PRIOR:
        from .tune_priors import TRIALS

        return [_record(dict(zip(("task", "variant", "lr", "metric", "loss_auc"), r)), "lorazoo.tune_priors")
                for r in TRIALS]
    path = Path(os.path.expanduser(str(source)))
    if not path.is_file():
        raise LorazooError(f"prior {str(source)!r}: no such file (give a study's .sqlite file or a trials.csv)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        return _sqlite_records(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise LorazooError(f"prior {str(path)!r} is neither a SQLite study file nor a readable CSV ({e})") from None
    need = {"task", "variant", "lr", "metric"}
    if not rows or not need <= set(rows[0]):
        raise LorazooError(f"prior {str(path)!r}: a trials CSV needs the columns {', '.join(sorted(need))} "
                           f"(as `lorazoo report` writes trials.csv)")
    return [_record(r, str(path)) for r in rows if _done(r)]


def _done(row: dict) -> bool:
    return row.get("status", "done") in ("done", None) and row.get("metric") not in (None, "")


def _record(row: dict, where: str) -> dict:
    try:
        rec = {"task": str(row["task"]), "variant": str(row["variant"]), "lr": float(row["lr"]),
               "metric": float(row["metric"])}
        auc = row.get("loss_auc")
        rec["loss_auc"] = None if auc in (None, "") else float(auc)
    except (KeyError, TypeError, ValueError) as e:
        raise LorazooError(f"prior {where}: bad trial row {row!r} ({e})") from None
    if not (rec["lr"] > 0 and math.isfinite(rec["lr"]) and math.isfinite(rec["metric"])):
        raise LorazooError(f"prior {where}: bad trial row {row!r} (lr must be > 0, metric finite)")
    return rec


def _sqlite_records(path: Path) -> list[dict]:
    from .study.errors import StudyError
    from .study.store import Store

    out = []
    try:
        with Store(path, create=False) as store:
            for name in store.studies():
                for t in store.trials(name, status="done"):
                    cfg = t.get("config") or {}
                    variant = t.get("variant") or cfg.get("variant")
                    if variant is None or t.get("metric") is None:
                        continue
                    auc = _loss_auc(t.get("losses"))
                    out.append(_record({"task": t.get("task") or cfg.get("task"), "variant": variant,
                                        "lr": t.get("lr") if t.get("lr") is not None else cfg.get("lr"),
                                        "metric": t["metric"], "loss_auc": auc}, str(path)))
    except StudyError as e:
        raise LorazooError(f"prior {str(path)!r}: {e}") from None
    except Exception as e:  # sqlite3.DatabaseError: not a study file
        raise LorazooError(f"prior {str(path)!r} is not a lorazoo study file ({type(e).__name__}: {e})") from None
    return out


def _loss_auc(losses) -> float | None:
    """The loss AUC ``lorazoo report`` writes into trials.csv (None without finite losses)."""
    try:
        from .analysis.curves import loss_auc
    except ImportError:  # pragma: no cover - the same definition: the trapezoid mean of the curve
        def loss_auc(ys):
            ys = [float(y) for y in ys or [] if y is not None and math.isfinite(float(y))]
            if len(ys) < 2:
                return ys[0] if ys else math.nan
            return sum((a + b) / 2 for a, b in zip(ys, ys[1:])) / (len(ys) - 1)
    value = loss_auc(losses)
    return None if not math.isfinite(value) else value


def best_rates(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """(task, variant) -> {"lr", "metric", "n", "learned"}: the best rate of each sweep (highest
    mean metric over seeds, ties within TIE broken by the lower mean loss AUC)."""
    cells: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for r in records:
        cells.setdefault((r["task"], r["variant"]), {}).setdefault(r["lr"], []).append(r)
    out = {}
    for key, by_lr in cells.items():
        rows = []
        for lr, rs in by_lr.items():
            aucs = [r["loss_auc"] for r in rs if r.get("loss_auc") is not None]
            rows.append((statistics.fmean(r["metric"] for r in rs), statistics.fmean(aucs) if aucs else math.inf, lr))
        top = max(m for m, _, _ in rows)
        tied = [row for row in rows if row[0] >= top - TIE]
        m, _, lr = min(tied, key=lambda row: (row[1], -row[0]))
        lift = top - statistics.median(m for m, _, _ in rows)
        moves = top - min(m for m, _, _ in rows)
        learned = len(rows) >= 3 and (lift >= MIN_SPREAD or moves >= MIN_RANGE)
        out[key] = {"lr": lr, "metric": m, "n": len(rows), "learned": learned}
    return out


def prior_for(records: Sequence[dict], task: str | None, variant: str | None, *,
              exclude_variants: Iterable[str] = ()) -> dict | None:
    """The prior on log10(best rate) for ``variant`` on ``task`` (see the module docstring):
    ``{"kind", "lr", "log10", "sd", "evidence"}``, or None when the records say nothing. Variants
    in ``exclude_variants`` are ignored (leave-one-out checks)."""
    excluded = set(exclude_variants)
    best = {k: v for k, v in best_rates(r for r in records if r["variant"] not in excluded).items() if v["learned"]}
    log = math.log10

    def make(kind, center, sd, evidence):
        return {"kind": kind, "lr": 10 ** center, "log10": center, "sd": sd, "evidence": evidence}

    if (task, variant) in best:
        b = best[(task, variant)]
        return make("same", log(b["lr"]), SD_SAME, {f"{task}/{variant}": b["lr"]})
    other_tasks = sorted({t for t, v in best if v == variant and (t, "lora") in best and t != task})
    if variant is not None and (task, "lora") in best and other_tasks:
        ratios = [log(best[(t, variant)]["lr"]) - log(best[(t, "lora")]["lr"]) for t in other_tasks]
        center = log(best[(task, "lora")]["lr"]) + statistics.fmean(ratios)
        return make("ratio", center, SD_RATIO, {f"{task}/lora": best[(task, "lora")]["lr"],
                                                 **{f"{t}/{variant}:lora": 10 ** q for t, q in zip(other_tasks, ratios)}})
    on_task = {v: b["lr"] for (t, v), b in best.items() if t == task}
    if on_task:
        logs = [log(x) for x in on_task.values()]
        sd = max(SD_TASK, statistics.pstdev(logs)) if len(logs) > 1 else SD_TASK
        return make("task", statistics.median(logs), sd, {f"{task}/{v}": x for v, x in sorted(on_task.items())})
    elsewhere = {t: b["lr"] for (t, v), b in best.items() if v == variant}
    if variant is not None and elsewhere:
        logs = [log(x) for x in elsewhere.values()]
        sd = max(SD_VARIANT, statistics.pstdev(logs)) if len(logs) > 1 else SD_VARIANT
        return make("variant", statistics.fmean(logs), sd, {f"{t}/{variant}": x for t, x in sorted(elsewhere.items())})
    return None


# --- the range test ------------------------------------------------------------------------------
def smooth(losses: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (fastai's lr_find smoothing)."""
    avg, out = 0.0, []
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def analyze_curve(lrs: Sequence[float], losses: Sequence[float], *, beta: float = RANGE["beta"],
                  diverge: float = RANGE["diverge"], min_steps: int = RANGE["min_steps"],
                  stopped_non_finite: bool = False) -> dict:
    """The points of a range-test curve: ``lr_min_loss`` (the rate of the smoothed minimum) and
    ``lr_div`` (the first rate where the smoothed loss exceeds its minimum so far by the fraction
    ``diverge``, both counted from step ``min_steps`` on; the rate after the last step when a non-finite loss stopped the
    test; None when the loss never rose so far). Pure: unit-testable on synthetic curves."""
    if len(lrs) != len(losses):
        raise LorazooError(f"a range test curve needs as many rates as losses, got {len(lrs)} and {len(losses)}")
    if not lrs:
        if stopped_non_finite:
            raise LorazooError("the range test went non-finite at its first step: lower lr_min")
        raise LorazooError("the range test has no steps")
    sm = smooth(losses, beta)
    lr_div, best, best_i = None, math.inf, 0
    start = min(int(min_steps), len(sm) - 1)   # the first steps' averages rest on too few losses
    for i in range(start, len(sm)):
        s = sm[i]
        if s < best:
            best, best_i = s, i
        elif s > best * (1 + diverge):
            lr_div = lrs[i]
            break
    if lr_div is None and stopped_non_finite:
        step = lrs[-1] / lrs[-2] if len(lrs) > 1 else 1.0
        lr_div = lrs[-1] * step
    return {"smoothed": sm, "lr_min_loss": lrs[best_i], "min_loss": best, "lr_div": lr_div}


def range_test(task, spec: AdapterSpec, *, lr_min: float = RANGE["lr_min"], lr_max: float = RANGE["lr_max"],
               steps: int = RANGE["steps"], batch_size: int = 8, seed: int = 0, beta: float = RANGE["beta"],
               diverge: float = RANGE["diverge"], max_grad_norm: float | None = 1.0) -> dict:
    """Run the exponential learning-rate range test (see the module docstring) on a task (a Task
    instance); the curve and its analysis as a dict."""
    from .adapt import adapt
    from .run import with_task_defaults
    from .train import NonFiniteError, Trainer

    check_number("lr_min", lr_min, strict=True)
    check_number("lr_max", lr_max, strict=True)
    check_number("steps", steps, minimum=2, integer=True)
    check_number("batch_size", batch_size, minimum=1, integer=True)
    if not lr_max > lr_min:
        raise LorazooError(f"lr_max must be above lr_min, got lr_min={lr_min}, lr_max={lr_max}")
    if not 0 <= beta < 1:
        raise LorazooError(f"beta must be in [0, 1), got {beta}")
    check_number("diverge", diverge, strict=True)
    t0, c0 = time.perf_counter(), time.process_time()
    spec = with_task_defaults(spec, task)
    torch.manual_seed(seed)  # as lorazoo.run.run: the fresh head's init
    model = task.build_model()
    calibration = None
    if spec.part_classes()["init"].needs_calibration:
        calibration = task.calibration_batches(batch_size=batch_size)
    handle = adapt(model, spec, calibration=calibration)
    torch.manual_seed(seed)  # dropout masks
    trainer = Trainer(model, handle, lr=lr_min, lr_schedule="constant", warmup=0, progress=False,
                      max_grad_norm=max_grad_norm)
    handle.plan(int(steps))
    base = [g["base_lr"] for g in trainer.optimizer.param_groups]
    pending: list[dict] = []
    epoch, lrs, losses, non_finite = 0, [], [], False
    best = math.inf
    for i in range(int(steps)):
        if not pending:
            pending = list(task.train_batches(int(batch_size), epoch))
            epoch += 1
            if not pending:
                raise LorazooError("the task produced no training batches; raise limit or lower batch_size")
        lr = lr_min * (lr_max / lr_min) ** (i / (int(steps) - 1))
        for g, b in zip(trainer.optimizer.param_groups, base):
            g["base_lr"] = b * (lr / lr_min)   # every group keeps its ratio to the base rate
        try:
            loss = trainer._step([pending.pop(0)], int(steps), 0)
        except NonFiniteError:
            non_finite = True
            break
        lrs.append(lr)
        losses.append(loss)
        if i >= RANGE["min_steps"]:
            s = smooth(losses, beta)[-1]
            best = min(best, s)
            if s > best * (1 + 4 * diverge):  # far past the edge: stop early
                break
    curve = analyze_curve(lrs, losses, beta=beta, diverge=diverge, stopped_non_finite=non_finite)
    return {"lrs": lrs, "losses": losses, **curve, "stopped_non_finite": non_finite, "steps_run": len(lrs),
            "settings": {"lr_min": lr_min, "lr_max": lr_max, "steps": int(steps), "batch_size": int(batch_size),
                         "beta": beta, "diverge": diverge, "seed": int(seed)},
            "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}


def estimate_from_curve(curve: dict, lr_max: float | None = None) -> dict:
    """The range test's estimate in log10 of the rate: ``{"log10", "sd", "lower_bound"}``."""
    lr_div = curve.get("lr_div")
    if lr_div is None:
        top = lr_max if lr_max is not None else max(curve["lrs"])
        return {"log10": math.log10(top / DIVERGENCE_FACTOR), "sd": 2 * SD_RANGE, "lower_bound": True}
    return {"log10": math.log10(lr_div / DIVERGENCE_FACTOR), "sd": SD_RANGE, "lower_bound": False}


# --- combining and snapping ---------------------------------------------------------------------
def check_grid(grid) -> list[float]:
    try:
        values = sorted({float(x) for x in grid})
    except (TypeError, ValueError):
        raise LorazooError(f"grid must be a list of positive learning rates, got {grid!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise LorazooError(f"grid must be a non-empty list of positive learning rates, got {grid!r}")
    return values


def snap(lr: float, grid=STUDY_GRID) -> float:
    """The rate of ``grid`` nearest to ``lr`` in log space (ties go to the smaller rate)."""
    check_number("lr", lr, strict=True)
    values = check_grid(grid)
    return min(values, key=lambda g: (abs(math.log10(g) - math.log10(lr)), g))


def grid_steps(a: float, b: float, grid=STUDY_GRID) -> int:
    """How many grid steps apart two rates of ``grid`` are (after snapping)."""
    values = check_grid(grid)
    return abs(values.index(snap(a, values)) - values.index(snap(b, values)))


def combine(estimate: dict, prior: dict | None, lr_div: float | None = None) -> dict:
    """Precision-weighted mean of the range test's and the prior's log10 rates, capped at
    ``lr_div / SAFETY``; ``{"log10", "lr", "weight_prior", "capped"}``."""
    if prior is None:
        center, w = estimate["log10"], 0.0
    else:
        pe, pp = 1 / estimate["sd"] ** 2, 1 / prior["sd"] ** 2
        w = pp / (pe + pp)
        center = (1 - w) * estimate["log10"] + w * prior["log10"]
    capped = False
    if lr_div is not None and center > math.log10(lr_div / SAFETY):
        center, capped = math.log10(lr_div / SAFETY), True
    return {"log10": center, "lr": 10 ** center, "weight_prior": w, "capped": capped}


# --- the whole proposal --------------------------------------------------------------------------
def variant_of(spec: AdapterSpec) -> str | None:
    """The catalogue name of the preset ``spec``'s parts match (None when none or several do)."""
    from .presets import PRESETS

    parts = ("form", "init", "scale", "optim", "schedule")
    mine = tuple(getattr(spec, p) for p in parts)
    found = [name for name, p in PRESETS.items() if tuple(getattr(AdapterSpec.preset(name), q) for q in parts) == mine]
    return found[0] if len(found) == 1 else ("lora" if "lora" in found else None)


def propose_lr(task, spec, *, variant: str | None = None, grid=STUDY_GRID, priors=DEFAULT_PRIOR,
               exclude_variants: Iterable[str] = (), steps: int = RANGE["steps"], lr_min: float = RANGE["lr_min"],
               lr_max: float = RANGE["lr_max"], batch_size: int = 8, limit: int | None = None, seed: int = 0,
               curve: dict | None = None, **task_options) -> dict:
    """Propose a learning rate for training ``spec`` on ``task`` (see the module docstring).

    ``task``: a task name (``"sentiment"``, ``"own"`` with ``model=`` and ``data=`` task options)
    or a built Task; ``limit``, ``seed`` and ``task_options`` as :func:`lorazoo.run.run` takes them.
    ``spec``: an AdapterSpec or a variant name; ``variant`` names it for the priors (by default the
    name given, or the preset whose parts ``spec`` has). ``priors``: ``"default"`` (the quick
    study shipped with lorazoo), a path to a study's .sqlite file or a trials.csv, a list of trial
    records, or None (the range test alone); ``exclude_variants`` drops variants from the priors.
    ``grid``: the rates the proposal is snapped to. ``steps``, ``lr_min``, ``lr_max``: the range
    test; ``batch_size`` should be the one the real run will use. ``curve``: a range test already
    run (the dict :func:`range_test` returns) to combine with other priors without training again.

    Returns ``{"lr" (snapped, the proposal), "lr_unsnapped", "range_test_lr" (the range test alone,
    snapped), "range_test": {...curve...}, "prior": {...} or None, "weight_prior", "capped", "grid",
    "task", "variant"}``.
    """
    from .tasks.base import Task, get_task

    values = check_grid(grid)
    if isinstance(spec, str):
        variant = variant or spec
        spec = AdapterSpec.preset(spec)
    if not isinstance(spec, AdapterSpec):
        raise LorazooError(f"spec must be a lorazoo.AdapterSpec or a variant name, got {type(spec).__name__}")
    if variant is None:
        variant = variant_of(spec)
    records = load_priors(priors)
    if isinstance(task, Task):
        if limit is not None or task_options:
            raise LorazooError("limit and task options go with a task name, not a built Task")
        t = task
    elif isinstance(task, str):
        t = get_task(task, limit=limit, seed=seed, options=task_options)
    else:
        raise LorazooError(f"task must be a task name or a lorazoo Task, got {type(task).__name__}")
    if spec.targets == "all-linear" and t.targets != "all-linear":  # as `lorazoo train`: the task's targets
        spec = AdapterSpec.from_dict({**spec.to_dict(), "targets": t.targets})
    if curve is None:
        curve = range_test(t, spec, lr_min=lr_min, lr_max=lr_max, steps=steps, batch_size=batch_size, seed=seed)
    estimate = estimate_from_curve(curve, curve.get("settings", {}).get("lr_max", lr_max))
    task_key = None if t.name == "own" else t.name   # your own data: no stored study of it
    prior = prior_for(records, task_key, variant, exclude_variants=exclude_variants) if records else None
    post = combine(estimate, prior, curve.get("lr_div"))
    alone = combine(estimate, None, curve.get("lr_div"))
    return {"lr": snap(post["lr"], values), "lr_unsnapped": post["lr"],
            "range_test_lr": snap(alone["lr"], values), "range_test_lr_unsnapped": alone["lr"],
            "weight_prior": post["weight_prior"], "capped": post["capped"],
            "estimate": estimate, "prior": prior,
            "prior_source": None if priors is None else (priors if isinstance(priors, str) else "records"),
            "prior_records": len(records), "excluded_variants": sorted(set(exclude_variants)),
            "range_test": curve, "grid": values, "task": t.name, "variant": variant,
            "spec": spec.to_dict()}


# --- the shipped priors -------------------------------------------------------------------------
def priors_module_text(records: Sequence[dict], source: str) -> str:
    """The text of ``lorazoo/tune_priors.py`` for ``records`` (regenerate after a new study with
    ``python -m lorazoo.tune docs/study/trials.csv > src/lorazoo/tune_priors.py``)."""
    rows = sorted((r["task"], r["variant"], r["lr"], r["metric"], r["loss_auc"]) for r in records)
    lines = [f'"""The checked-in study\'s trials, the default priors of lorazoo.tune (generated from {source}',
             'by `python -m lorazoo.tune`; do not edit). Rows: (task, variant, lr, metric, loss_auc)."""',
             "", "TRIALS = ("]
    lines += [f"    ({t!r}, {v!r}, {lr!r}, {round(m, 4)!r}, {None if a is None else round(a, 4)!r}),"
              for t, v, lr, m, a in rows]
    lines.append(")")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    import sys

    src = sys.argv[1] if len(sys.argv) > 1 else "docs/study/trials.csv"
    sys.stdout.write(priors_module_text(load_priors(src), src))
