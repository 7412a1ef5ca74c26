"""The papers' findings as data, each with a function that gives its verdict from a study's trials.

A finding names its source, states the claim, quotes the paper's numbers, and names the suite
whose trials test it (``lorazoo study --suite NAME``). Its check takes the study's trial rows
(``Store.trials``) and returns a :class:`Verdict`: ``holds``, ``does not hold``, ``not testable
here`` (the trials exist but cannot decide: too few seeds, too coarse a grid, a resolution wider
than the claimed effect, or a claim about something trials do not measure) or ``not run`` (no
trial of the kind), with our numbers beside the paper's and the reason.

Statistics: a cell is one configuration (task, variant, learning rate, other options) over its
seeds; it is reported as mean ± sd over seeds. Two cells differ when their difference exceeds
``Z`` standard errors: of the seed-by-seed differences when both ran the same seeds (a seed fixes
init and data order in every configuration), else pooled, sqrt(sd1²/n1 + sd2²/n2) (verdicts.diff);
comparisons need at least ``MIN_SEEDS`` seeds per cell. A variant's "best" is its learning rate with the highest mean (``summary.best_rows``).
Metrics are fractions (accuracy 0.75), so the papers' points are divided by 100.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

from .grid import STUDY_OPTIONS
from ..analysis.curves import loss_auc
from . import findings_weights as W
from .suites import BASELINES
from .summary import _mean, best_rows
from .verdicts import FAILS, HOLDS, MIN_SEEDS, NOT_RUN, UNTESTABLE, Z, Verdict, diff, fmt, stats
from .verdicts import done as _done, seed_reason as _seed_reason

BASE_KEYS = ("task", "variant", "lr", "seed")

# the study's 20 evaluated variants (its Tables IV-X), by family
STUDY_VARIANTS = ["lora", "hira", "rasa", "adalora", "melora", "denselora", "randlora", "relora", "dora",
                  "rslora", "loraplus", "delora", "eva", "pissa", "lora_ga", "lora_one", "nzlora", "goat",
                  "moslora", "loramoe"]
# the study's "enhanced gradient flow" group: initialization variants, LoRA+ and MeLoRA (Sec. IV NLU)
GRADIENT_FLOW = ["eva", "pissa", "lora_ga", "lora_one", "nzlora", "loraplus", "melora"]
# the forms it says need 10-1000x LoRA's rate (AdaLoRA, DoRA, DeLoRA, HiRA; Sec. IV NLU)
STRUCTURED = ["hira", "adalora", "dora", "delora"]
# GLUE average per variant (study Tables IV-X): (best over the 7 rates, score at 5e-4, 5x LoRA's best 1e-4)
PAPER_GLUE = {"lora": (79.66, 68.65), "hira": (79.57, 77.27), "rasa": (81.37, 81.37), "adalora": (79.75, 78.29),
              "melora": (78.66, 34.26), "denselora": (80.36, 59.70), "randlora": (77.37, 77.21),
              "relora": (80.61, 77.60), "dora": (79.24, 78.15), "rslora": (79.29, 55.53),
              "loraplus": (78.39, 35.45), "delora": (77.73, 77.56), "eva": (77.76, 68.30), "pissa": (78.24, 46.30),
              "lora_ga": (79.95, 34.14), "lora_one": (80.18, 68.96), "nzlora": (77.65, 46.49),
              "goat": (78.50, 43.47), "moslora": (79.57, 78.67), "loramoe": (75.82, 33.01)}
PAPER_GLUE_FLOOR = 33.0  # where collapsed runs end on GLUE's average (its 5e-3 table: 32.6-34.5)


@dataclass(frozen=True)
class Finding:
    key: str
    title: str
    source: str
    claim: str
    paper: str     # the paper's numbers
    suite: str     # the suite whose trials test it
    check: Callable[[list[dict]], Verdict]


# --- cells -------------------------------------------------------------------------------------
def _rest(cfg: dict, drop: tuple = ()) -> str:
    """A trial config without the grid's base axes, the study options and ``drop``, as a key."""
    return json.dumps({k: v for k, v in cfg.items() if k not in BASE_KEYS + STUDY_OPTIONS + tuple(drop)},
                      sort_keys=True)


def main_grid(trials: list[dict], variants=STUDY_VARIANTS) -> dict[str, dict[str, dict[float, list[dict]]]]:
    """Per task: variant -> lr -> trials (seeds) of ``variants``, keeping only the task's most common
    configuration (other options equal), so trials of other sweeps (ranks, dropouts) do not mix in."""
    done = [t for t in _done(trials) if t["config"]["variant"] in variants]
    out: dict = {}
    for task in sorted({t["config"]["task"] for t in done}):
        mine = [t for t in done if t["config"]["task"] == task]
        common = Counter(_rest(t["config"]) for t in mine).most_common(1)[0][0]
        grid: dict = defaultdict(lambda: defaultdict(list))
        for t in mine:
            if _rest(t["config"]) == common:
                grid[t["config"]["variant"]][float(t["config"]["lr"])].append(t)
        out[task] = grid
    return out


def best(by_lr: dict[float, list[dict]]) -> tuple[float, tuple]:
    """(best lr, stats at it) of one variant's cells (highest mean over seeds; summary.best_rows)."""
    row = best_rows({"v": by_lr})[0]
    return row["best_lr"], stats(by_lr[row["best_lr"]])


def _few_seeds(cells) -> bool:
    return any(len(ts) < MIN_SEEDS for ts in cells)


def _combine(per_task: dict[str, tuple[str, str]], what: str) -> Verdict:
    """One verdict from per-task (verdict, numbers): holds only if it holds on every testable task."""
    tested = {k: v for k, v in per_task.items() if v[0] in (HOLDS, FAILS)}
    ours = "; ".join(f"{task}: {text}" for task, (v, text) in per_task.items() if v in (HOLDS, FAILS))
    if not tested:
        kinds = {v[0] for v in per_task.values()}
        return Verdict(UNTESTABLE if kinds - {NOT_RUN} else NOT_RUN, ours,
                       "; ".join(f"{k}: {text}" for k, (_, text) in per_task.items()) or "no trials")
    untested = "".join(f"; {k} could not test it: {text}" for k, (v, text) in per_task.items()
                       if v not in (HOLDS, FAILS))
    held = [k for k, v in tested.items() if v[0] == HOLDS]
    if len(held) == len(tested):
        return Verdict(HOLDS, ours, f"{what} on every task that could test it ({', '.join(held)}){untested}")
    failed = [k for k in tested if k not in held]
    return Verdict(FAILS, ours, f"{what}: not on {', '.join(failed)}"
                   + (f" (it does on {', '.join(held)})" if held else "") + untested)


def _lrs(grid: dict) -> list[float]:
    return sorted({lr for by_lr in grid.values() for lr in by_lr})


# --- the unified study's findings ----------------------------------------------------------------
def check_lr_dominates(trials: list[dict]) -> Verdict:
    per_task = {}
    for task, grid in main_grid(trials).items():
        multi = {v: by_lr for v, by_lr in grid.items() if len(by_lr) >= 3}
        if len(multi) < 3:
            per_task[task] = (NOT_RUN, f"{len(multi)} variant(s) with 3+ learning rates")
            continue
        if _few_seeds(ts for by_lr in multi.values() for ts in by_lr.values()):
            per_task[task] = (UNTESTABLE, _seed_reason(min(len(ts) for b in multi.values() for ts in b.values())))
            continue
        swings, bests = [], []
        for by_lr in multi.values():
            means = [stats(ts)[0] for ts in by_lr.values()]
            swings.append(max(means) - min(means))
            bests.append(max(means))
        swing = sorted(swings)[len(swings) // 2]
        spread = max(bests) - min(bests)
        ses = sorted(stats(ts)[1] / math.sqrt(len(ts)) for b in multi.values() for ts in b.values())
        text = (f"median swing over {len(_lrs(multi))} rates {swing:.3f}, spread of the {len(multi)} variants' "
                f"bests {spread:.3f} (typical cell SE {ses[len(ses) // 2]:.3f})")
        per_task[task] = (HOLDS if swing > spread else FAILS, text)
    return _combine(per_task, "a variant's swing over the learning rates exceeds the spread of the variants' bests")


def _lora_best(grid: dict) -> tuple[float, tuple] | None:
    return best(grid["lora"]) if "lora" in grid and grid["lora"] else None


def _not_tuned(by_lr: dict, name: str = "LoRA") -> str | None:
    """Why a variant's best rate is not a tuned one (fewer than 3 rates, or its best at the grid's
    edge), or None."""
    lrs = sorted(by_lr)
    if len(lrs) < 3:
        return f"{name} ran at {len(lrs)} learning rate(s): its rate is not tuned (3+ needed)"
    lr = best(by_lr)[0]
    if lr in (lrs[0], lrs[-1]):
        return f"{name}'s best rate {lr:g} is at the edge of its grid ({lrs[0]:g}-{lrs[-1]:g}): not bracketed"
    return None


def _not_learned(ts: list[dict], name: str = "LoRA") -> str | None:
    """Why a cell shows no learning (its metric not above its metric before training by 2 SE), or None."""
    m, sd, n = stats(ts)
    before = _mean([t.get("metric_before") for t in ts])
    margin = Z * sd / math.sqrt(n) if n >= MIN_SEEDS and math.isfinite(sd) else 0.0
    if not math.isfinite(before) or m - before > max(margin, 0.01):
        return None
    return f"{name} did not learn ({before:.3f} before, {m:.3f} after): nothing to compare"


def _rate_near(lrs: list[float], target: float) -> float | None:
    """The grid rate within a factor 1.5 of ``target`` (nearest on a log scale), or None."""
    near = [lr for lr in lrs if target / 1.5 <= lr <= target * 1.5]
    return min(near, key=lambda lr: abs(math.log(lr / target))) if near else None


def _no_rate_near(lrs: list[float], lstar: float, factor: float) -> tuple[str, list[float]]:
    """Why no grid rate is near ``factor`` x LoRA's best, and the grid's rates above LoRA's best on either
    side of it."""
    below = [lr for lr in lrs if lstar < lr < lstar * factor]
    above = [lr for lr in lrs if lr > lstar * factor]
    side = ([max(below)] if below else []) + ([min(above)] if above else [])
    return (f"LoRA's best rate {lstar:g} has no grid rate near {factor:g}x above it (within 1.5x; the nearest: "
            f"{', '.join(f'{lr:g} = {lr / lstar:g}x' for lr in side) or 'none'}), where the paper's claim is (its "
            f"grid's next rate above LoRA's best)", side)


def check_gradient_flow(trials: list[dict]) -> Verdict:
    per_task = {}
    for task, grid in main_grid(trials).items():
        group = [v for v in GRADIENT_FLOW if v in grid]
        if not group or "lora" not in grid:
            per_task[task] = (NOT_RUN, "no LoRA or no initialization/LoRA+/MeLoRA variant")
            continue
        lrs = _lrs(grid)
        lstar, _ = _lora_best(grid)
        low = [lr for lr in lrs if lr <= lstar / 5 + 1e-15]
        hi = _rate_near(lrs, 5 * lstar)
        if not low:
            per_task[task] = (UNTESTABLE, f"LoRA's best rate {lstar:g} has no grid rate 5x below it")
            continue
        if hi is None:
            why, side = _no_rate_near(lrs, lstar, 5)
            per_task[task] = (UNTESTABLE, why + "".join(f"; at {lr:g}: {_leads(grid, group, lr)}" for lr in side))
            continue
        lo = max(low)
        cells = [grid[v].get(lr, []) for v in group + ["lora"] for lr in (lo, hi)]
        if any(not c for c in cells):
            per_task[task] = (UNTESTABLE, f"missing cells at {lo:g} or {hi:g}")
            continue
        if _few_seeds(cells):
            per_task[task] = (UNTESTABLE, _seed_reason(min(len(c) for c in cells)))
            continue
        win = [v for v in group if _ahead(grid, v, lo)]
        lost = [v for v in group if not _ahead(grid, v, hi)]
        ok = len(win) * 2 > len(group) and len(lost) * 2 > len(group)
        text = (f"vs LoRA at {lo:g} / {hi:g} (LoRA's best {lstar:g}): low {_leads(grid, group, lo)}; high "
                f"{_leads(grid, group, hi)}; {len(win)}/{len(group)} ahead at the low rate, {len(lost)}/{len(group)} "
                f"not ahead at the high one")
        per_task[task] = (HOLDS if ok else FAILS, text)
    return _combine(per_task, "most of the group beat LoRA at a low rate and lose the lead 5x above LoRA's best")


def _ahead(grid: dict, v: str, lr: float) -> bool:
    d, se = diff(stats(grid[v][lr]), stats(grid["lora"][lr]))
    return d > Z * se


def _leads(grid: dict, group: list[str], lr: float) -> str:
    """Each variant's lead over LoRA at ``lr`` (where both ran)."""
    if lr not in grid["lora"]:
        return "no LoRA cell"
    return ", ".join(f"{v} {diff(stats(grid[v][lr]), stats(grid['lora'][lr]))[0]:+.3f}"
                     for v in group if lr in grid[v]) or "no cells"


def check_tuned_lora(trials: list[dict]) -> Verdict:
    per_task = {}
    for task, grid in main_grid(trials).items():
        others = [v for v in grid if v != "lora"]
        if "lora" not in grid or not others:
            per_task[task] = (NOT_RUN, "no LoRA or no other variant")
            continue
        lstar, ls = _lora_best(grid)
        bests = {v: best(grid[v]) for v in others}
        top = max(bests, key=lambda v: bests[v][1][0])
        why = _not_tuned(grid["lora"]) or _not_learned(grid["lora"][lstar])
        if why:
            per_task[task] = (UNTESTABLE, why)
            continue
        if ls[2] < MIN_SEEDS or bests[top][1][2] < MIN_SEEDS:
            per_task[task] = (UNTESTABLE, _seed_reason(min(ls[2], bests[top][1][2])))
            continue
        d, se = diff(bests[top][1], ls)
        above = [v for v, (_, s) in bests.items() if diff(s, ls)[0] > Z * diff(s, ls)[1]]
        text = (f"LoRA {fmt(ls)} at {lstar:g}; best variant {top} {fmt(bests[top][1])} at {bests[top][0]:g}: "
                f"{d:+.3f} ± {se:.3f}; significantly above LoRA: {', '.join(above) or 'none'} of {len(others)}")
        per_task[task] = (HOLDS if d <= max(Z * se, 0.0008) else FAILS, text)
    return _combine(per_task, "tuned LoRA is within noise (or 0.08 points) of the best variant")


def _collapsed(at: float, peak: float, floor: float) -> bool | None:
    """Whether a score ``at`` lost more than half of the variant's gain over ``floor``; None if it never gained."""
    if peak - floor <= 0:
        return None
    return at - floor < 0.5 * (peak - floor)


def paper_collapsed() -> set[str]:
    """The study's variants that collapse at 5e-4 on GLUE, by the same rule as ours."""
    return {v for v, (peak, at) in PAPER_GLUE.items() if _collapsed(at, peak, PAPER_GLUE_FLOOR)}


def check_collapse(trials: list[dict]) -> Verdict:
    per_task = {}
    for task, grid in main_grid(trials).items():
        if "lora" not in grid or len(grid) < 3:
            per_task[task] = (NOT_RUN, "no LoRA or fewer than 3 variants")
            continue
        lstar, _ = _lora_best(grid)
        floor = sorted(t["metric_before"] for by_lr in grid.values() for ts in by_lr.values() for t in ts
                       if t.get("metric_before") is not None)
        floor = floor[len(floor) // 2] if floor else 0.0
        lrs = _lrs(grid)
        hi = _rate_near(lrs, 5 * lstar)
        if hi is None:
            why, side = _no_rate_near(lrs, lstar, 5)
            per_task[task] = (UNTESTABLE, why + "".join(
                f"; at {lr:g} collapsed {', '.join(sorted(_collapsed_at(grid, lr, floor)[0])) or 'none'}" for lr in side))
            continue
        shared = [v for v in grid if v in PAPER_GLUE and hi in grid[v]]
        if _few_seeds(grid[v][hi] for v in shared):
            per_task[task] = (UNTESTABLE, _seed_reason(min((len(grid[v][hi]) for v in shared), default=0)))
            continue
        ours, never = _collapsed_at(grid, hi, floor)
        judged = [v for v in shared if v not in never]
        if len(judged) < 5:
            per_task[task] = (UNTESTABLE, f"only {len(judged)} variants that learned at all (need 5)")
            continue
        paper = paper_collapsed()
        agree = [v for v in judged if (v in ours) == (v in paper)]
        text = (f"at {hi:g} (LoRA's best {lstar:g}, floor {floor:.3f}): collapsed {', '.join(sorted(ours)) or 'none'}; "
                f"agree with the paper on {len(agree)}/{len(judged)}"
                + (f"; differ: {', '.join(sorted(set(judged) - set(agree)))}" if len(agree) < len(judged) else "")
                + (f"; never learned: {', '.join(never)}" if never else ""))
        per_task[task] = (HOLDS if len(agree) >= 0.75 * len(judged) else FAILS, text)
    return _combine(per_task, "the variants collapsing 5x above LoRA's best rate match the paper's (75%+ agree)")


def _collapsed_at(grid: dict, lr: float, floor: float) -> tuple[set[str], list[str]]:
    """(the study's variants that lost over half their gain over ``floor`` at ``lr``, above their best
    rate (below it a variant has not started learning: that is no collapse), those that never gained)."""
    ours, never = set(), []
    for v in grid:
        if v in PAPER_GLUE and lr in grid[v]:
            peak_lr, (peak, *_) = best(grid[v])
            c = _collapsed(stats(grid[v][lr])[0], peak, floor)
            if c is None:
                never.append(v)
            elif c and peak_lr < lr:
                ours.add(v)
    return ours, never


def check_structured_rate(trials: list[dict]) -> Verdict:
    per_task = {}
    for task, grid in main_grid(trials).items():
        group = [v for v in STRUCTURED if v in grid]
        if "lora" not in grid or not group:
            per_task[task] = (NOT_RUN, "no LoRA or none of HiRA, AdaLoRA, DoRA, DeLoRA")
            continue
        lstar, _ = _lora_best(grid)
        top = max(_lrs(grid))
        why = _not_tuned(grid["lora"])
        if why or top < 10 * lstar - 1e-15:
            per_task[task] = (UNTESTABLE, why or f"no grid rate 10x above LoRA's best {lstar:g}")
            continue
        cells = [grid[v][lr] for v in group for lr in (lstar, best(grid[v])[0]) if lr in grid[v]]
        if _few_seeds(cells):
            per_task[task] = (UNTESTABLE, _seed_reason(min(len(c) for c in cells)))
            continue
        higher, parts = [], []
        for v in group:
            vlr, vs = best(grid[v])
            ratio = vlr / lstar
            resolved = lstar in grid[v] and (lambda d: d[0] > Z * d[1])(diff(vs, stats(grid[v][lstar])))
            if ratio >= 10 - 1e-9 and (resolved or lstar not in grid[v]):
                higher.append(v)
            parts.append(f"{v} best {vlr:g} ({'>=' if vlr == top else ''}{ratio:g}x)")
        ok = len(higher) * 2 > len(group)
        text = f"LoRA's best {lstar:g}; " + ", ".join(parts) + f"; {len(higher)}/{len(group)} need 10x or more"
        per_task[task] = (HOLDS if ok else FAILS, text)
    return _combine(per_task, "most structured forms peak 10x or more above LoRA's rate")


def check_dora_memory(trials: list[dict]) -> Verdict:
    """DoRA against every variant by the activations a training step keeps for backward (``saved_mb``,
    lorazoo.memory: exact, the same on any device), not by a trial's peak RSS (the whole process)."""
    per_task = {}
    for task, grid in main_grid(trials).items():
        if "dora" not in grid or "lora" not in grid:
            per_task[task] = (NOT_RUN, "no DoRA and LoRA trials on the same task")
            continue
        by_seed = defaultdict(lambda: defaultdict(list))  # a seed's first batch sets the padded length
        for v, by_lr in grid.items():
            for t in (t for ts in by_lr.values() for t in ts):
                mb = (t.get("result") or {}).get("saved_mb")
                if mb is not None and math.isfinite(mb) and mb > 0:
                    by_seed[v][t["config"]["seed"]].append(mb)
        seeds = set.intersection(*(set(d) for d in by_seed.values())) if by_seed else set()
        saved = {v: _mean([_mean(d[s]) for s in seeds]) for v, d in by_seed.items()} if seeds else {}
        if not {"dora", "lora"} <= set(saved):
            peak = {v: _mean([t.get("peak_rss_mb") for ts in grid[v].values() for t in ts]) for v in ("dora", "lora")}
            per_task[task] = (UNTESTABLE, f"its trials predate the saved-for-backward count (peak RSS of the whole "
                                          f"process: DoRA {peak['dora']:.0f} MB, LoRA {peak['lora']:.0f} MB)")
            continue
        ranked = sorted(saved, key=saved.get, reverse=True)
        above = ranked[:ranked.index("dora")]
        text = (f"kept for backward per step: DoRA {saved['dora']:.1f} MB vs LoRA {saved['lora']:.1f} MB "
                f"({saved['dora'] / saved['lora'] - 1:+.0%}); DoRA {len(above) + 1} of {len(saved)} variants"
                + (f" (above it: {', '.join(f'{v} {saved[v]:.1f}' for v in above)})" if above else ""))
        per_task[task] = (HOLDS if not above and len(saved) >= 3 else FAILS if above else UNTESTABLE, text)
    return _combine(per_task, "DoRA keeps the most for backward of the variants")


# --- the seeds' claims ---------------------------------------------------------------------------
def _family(trials: list[dict], variants: tuple, vary: tuple) -> dict[tuple, dict[float, list[dict]]]:
    """Trials of ``variants``, grouped by (task, the other options, the resolved spec's ``vary``
    fields) -> lr -> seeds; keys are (task, rest, values of vary)."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for t in _done(trials):
        cfg = t["config"]
        if cfg["variant"] not in variants:
            continue
        spec = t.get("spec") or {}
        vals = tuple(json.dumps(spec.get(k, cfg.get(k)), sort_keys=True) for k in vary)
        out[(cfg["task"], cfg["variant"] if len(variants) > 1 and "variant" not in vary else "",
             _rest(cfg, drop=vary), vals)][float(cfg["lr"])].append(t)
    return out


def _verdict_gain(d: float, se: float, min_gain: float) -> str:
    """Holds if d is significantly > 0; does not hold if d + Z·se < min_gain; else not testable."""
    if not math.isfinite(se):
        return UNTESTABLE
    if d - Z * se > 0:
        return HOLDS
    if d + Z * se < min_gain:
        return FAILS
    return UNTESTABLE


def _droplora_sweep(trials: list[dict]):
    """(task, {rank_dropout: (best lr, stats)}, {dropout: (best lr, stats)}) of the biggest LoRA sweep."""
    fam = _family(trials, ("lora", "droplora"), ("rank_dropout", "dropout"))
    groups: dict = defaultdict(dict)
    for (task, _, rest, (rd, dr)), by_lr in fam.items():
        spec = next(t["spec"] for ts in by_lr.values() for t in ts)
        if spec.get("form", "lora") != "lora":
            continue
        groups[(task, rest)][(float(json.loads(rd)), float(json.loads(dr)))] = by_lr
    cands = [(k, g) for k, g in groups.items() if (0.0, 0.0) in g and any(rd > 0 and dr == 0 for rd, dr in g)]
    if not cands:
        return None
    (task, _), g = max(cands, key=lambda kg: len(kg[1]))
    rank = {rd: best(by_lr) for (rd, dr), by_lr in g.items() if dr == 0}
    inp = {dr: best(by_lr) for (rd, dr), by_lr in g.items() if rd == 0 and dr > 0}
    return task, rank, inp


def check_droplora_gain(trials: list[dict]) -> Verdict:
    sweep = _droplora_sweep(trials)
    if sweep is None:
        return Verdict(NOT_RUN, "", "no LoRA trials with and without rank dropout on the same task")
    task, rank, inp = sweep
    p = 0.3 if 0.3 in rank else max(rank)
    lora, drop = rank[0.0][1], rank[p][1]
    d, se = diff(drop, lora)
    ours = (f"{task}: rank dropout {p:g} {fmt(drop)} vs LoRA {fmt(lora)}: {d:+.3f} ± {se:.3f}"
            + "".join(f"; LoRA with input dropout {q:g}: {fmt(s)}" for q, (_, s) in sorted(inp.items())))
    v = _verdict_gain(d, se, 0.005)
    if not math.isfinite(se):
        return Verdict(UNTESTABLE, ours, _seed_reason(min(drop[2], lora[2])))
    reason = {HOLDS: "rank dropout is ahead of LoRA by more than 2 SE",
              FAILS: f"the gain is below the claimed 0.005 by more than 2 SE (upper bound {d + Z * se:+.3f})",
              UNTESTABLE: f"the interval {d - Z * se:+.3f}..{d + Z * se:+.3f} holds both no gain and the claimed "
                          f"0.005-0.008: more seeds or a larger test split are needed"}[v]
    return Verdict(v, ours, reason)


def check_droplora_best(trials: list[dict]) -> Verdict:
    sweep = _droplora_sweep(trials)
    if sweep is None:
        return Verdict(NOT_RUN, "", "no LoRA trials with and without rank dropout on the same task")
    task, rank, _ = sweep
    ps = sorted(p for p in rank if p > 0)
    if 0.3 not in rank or len(ps) < 3:
        return Verdict(UNTESTABLE, f"{task}: rank dropouts {ps}", "the sweep needs 0.3 and at least two other rates")
    top = max(ps, key=lambda p: rank[p][1][0])
    ours = f"{task}: " + ", ".join(f"{p:g}: {rank[p][1][0]:.3f}" for p in sorted(rank)) + f"; best {top:g}"
    d, se = diff(rank[top][1], rank[0.3][1])
    if not math.isfinite(se):
        return Verdict(UNTESTABLE, ours, _seed_reason(min(rank[top][1][2], rank[0.3][1][2])))
    if top == 0.3:
        second = max((p for p in ps if p != 0.3), key=lambda p: rank[p][1][0])
        d2, se2 = diff(rank[0.3][1], rank[second][1])
        if d2 - Z * se2 > 0:
            return Verdict(HOLDS, ours, f"0.3 is above the next best rate ({second:g}) by more than 2 SE")
        return Verdict(UNTESTABLE, ours, f"0.3 has the highest mean, {d2:.3f} above {second:g}, within 2 SE "
                                         f"(SE {se2:.3f}): not resolved")
    if d > Z * se:
        return Verdict(FAILS, ours, f"{top:g} is above 0.3 by {d:.3f}, more than 2 SE (SE {se:.3f})")
    return Verdict(UNTESTABLE, ours, f"{top:g} is above 0.3 by {d:.3f}, within 2 SE (SE {se:.3f}): not resolved")


def _lorma_grid(trials: list[dict]):
    """(task, grid) of the task whose main grid has LoRA and a LoRMA variant, or None."""
    for task, grid in main_grid(trials, ("lora", "lorma_plus", "lorma_pi")).items():
        if "lora" in grid and any(v in grid for v in ("lorma_plus", "lorma_pi")):
            return task, grid
    return None


def check_lorma_par(trials: list[dict]) -> Verdict:
    found = _lorma_grid(trials)
    if found is None:
        return Verdict(NOT_RUN, "", "no LoRMA and LoRA trials on the same task")
    task, grid = found
    lstar, ls = _lora_best(grid)
    verdicts, parts = [], [f"{task}: LoRA {fmt(ls)} at {lstar:g}"]
    why = _not_tuned(grid["lora"]) or _not_learned(grid["lora"][lstar])
    if why:
        return Verdict(UNTESTABLE, parts[0], why)
    for v in ("lorma_plus", "lorma_pi"):
        if v not in grid:
            continue
        vlr, vs = best(grid[v])
        d, se = diff(vs, ls)
        parts.append(f"{v} {fmt(vs)} at {vlr:g}: {d:+.3f} ± {se:.3f}")
        verdicts.append(UNTESTABLE if not math.isfinite(se) else FAILS if d < -Z * se else HOLDS)
    ours = "; ".join(parts)
    if UNTESTABLE in verdicts:
        return Verdict(UNTESTABLE, ours, _seed_reason(1))
    if FAILS in verdicts:
        return Verdict(FAILS, ours, "a LoRMA variant's best is below LoRA's by more than 2 SE")
    return Verdict(HOLDS, ours, "no LoRMA variant's best is below LoRA's by more than 2 SE")


def check_lorma_auc(trials: list[dict]) -> Verdict:
    found = _lorma_grid(trials)
    if found is None:
        return Verdict(NOT_RUN, "", "no LoRMA and LoRA trials on the same task")
    task, grid = found
    lstar, _ = _lora_best(grid)
    la = stats(grid["lora"][lstar], lambda t: loss_auc(t.get("losses")))
    verdicts, parts = [], [f"{task}: LoRA's loss AUC {fmt(la)} at {lstar:g}"]
    why = _not_learned(grid["lora"][lstar])
    if why:
        return Verdict(UNTESTABLE, parts[0], why)
    for v in ("lorma_plus", "lorma_pi"):
        if v not in grid:
            continue
        vlr, _ = best(grid[v])
        va = stats(grid[v][vlr], lambda t: loss_auc(t.get("losses")))
        if min(la[2], va[2]) < MIN_SEEDS or not la[0] > 0:
            verdicts.append(UNTESTABLE)
            parts.append(f"{v} {fmt(va)} at {vlr:g}")
            continue
        r = 1 - va[0] / la[0]  # relative AUC reduction; SE by the delta method
        se = math.sqrt((va[1] / math.sqrt(va[2]) / la[0]) ** 2 + (va[0] * la[1] / math.sqrt(la[2]) / la[0] ** 2) ** 2)
        parts.append(f"{v} {fmt(va)} at {vlr:g}: {r:+.0%} ± {se:.0%} lower")
        verdicts.append(HOLDS if r - Z * se > 0 and r + Z * se >= 0.30 else FAILS if r + Z * se < 0.30 else UNTESTABLE)
    ours = "; ".join(parts)
    if FAILS in verdicts:
        return Verdict(FAILS, ours, "a LoRMA variant's AUC reduction is below 30% by more than 2 SE")
    if verdicts and all(v == HOLDS for v in verdicts):
        return Verdict(HOLDS, ours, "each LoRMA variant's loss AUC is significantly lower, consistent with 30-52%")
    return Verdict(UNTESTABLE, ours, "too few seeds, or the reduction's interval holds both 0 and 30%")


# "Comparable" as an equivalence margin: LoRMA calls 0.3-0.4 points "almost comparable" (Table 7) and
# speaks of results "within about a point"; equivalence holds when the difference's 2-SE interval lies in it.
COMPARABLE = 0.01


def check_lorma_order(trials: list[dict]) -> Verdict:
    """LoRMA+ post- against pre-multiplication (its Table 7), each at its best rate; an equivalence
    test against :data:`COMPARABLE` (two one-sided tests at 2 SE)."""
    orders: dict = defaultdict(lambda: defaultdict(list))
    for (task, _, rest, (order,)), by_lr in _family(trials, ("lorma_plus",), ("lorma_order",)).items():
        for lr, ts in by_lr.items():
            orders[(task, rest)][json.loads(order) or "pre"].extend((lr, t) for t in ts)
    pairs = {k: v for k, v in orders.items() if {"pre", "post"} <= set(v)}
    if not pairs:
        return Verdict(NOT_RUN, "", "no LoRMA+ trials in both orders with the same other options")
    (task, _), cells = max(pairs.items(), key=lambda kv: sum(len(v) for v in kv[1].values()))
    bests, why = {}, None
    for order in ("pre", "post"):
        by_lr: dict = defaultdict(list)
        for lr, t in cells[order]:
            by_lr[lr].append(t)
        bests[order] = best(by_lr)
        why = why or _not_tuned(by_lr, f"LoRMA+ ({order})")
    (plr, ps), (qlr, qs) = bests["pre"], bests["post"]
    d, se = diff(qs, ps)
    ours = f"{task}: pre {fmt(ps)} at {plr:g}, post {fmt(qs)} at {qlr:g}: post - pre {d:+.3f} ± {se:.3f}"
    if why:
        return Verdict(UNTESTABLE, ours, why)
    if not math.isfinite(se):
        return Verdict(UNTESTABLE, ours, _seed_reason(min(ps[2], qs[2])))
    if abs(d) - Z * se > COMPARABLE:
        return Verdict(FAILS, ours, f"the orders' bests differ by more than {COMPARABLE:g}, beyond 2 SE")
    if abs(d) + Z * se <= COMPARABLE:
        return Verdict(HOLDS, ours, f"the difference and its 2-SE interval lie within ±{COMPARABLE:g}")
    return Verdict(UNTESTABLE, ours, f"the 2-SE interval of the difference, {abs(d) - Z * se:.3f}-{abs(d) + Z * se:.3f}, "
                                     f"straddles the ±{COMPARABLE:g} of \"comparable\"")


def check_lora_rank(trials: list[dict]) -> Verdict:
    fam = _family(trials, ("lora",), ("rank", "alpha"))
    groups: dict = defaultdict(dict)
    for (task, _, rest, (rank, _alpha)), by_lr in fam.items():
        if "targets" in json.loads(rest):
            groups[(task, rest)][int(json.loads(rank))] = by_lr
    cands = [(k, g) for k, g in groups.items() if 1 in g and len(g) >= 3]
    if not cands:
        return Verdict(NOT_RUN, "", "no LoRA trials at rank 1 and two other ranks with the same explicit targets")
    (task, rest), g = max(cands, key=lambda kg: len(kg[1]))
    ranks = {r: best(by_lr) for r, by_lr in g.items()}
    top = max((r for r in ranks if r != 1), key=lambda r: ranks[r][1][0])
    d, se = diff(ranks[top][1], ranks[1][1])
    ours = (f"{task} targets {json.loads(rest)['targets']}: "
            + ", ".join(f"r={r}: {ranks[r][1][0]:.3f}" for r in sorted(ranks))
            + f"; best other rank {top} is {d:+.3f} ± {se:.3f} above rank 1")
    if not math.isfinite(se):
        return Verdict(UNTESTABLE, ours, _seed_reason(min(ranks[top][1][2], ranks[1][1][2])))
    if d - Z * se > 0.004:
        return Verdict(FAILS, ours, "rank 1 is below the best rank by more than the paper's 0.4 points, beyond 2 SE")
    return Verdict(HOLDS, ours, "rank 1 is within 0.4 points (plus 2 SE) of the best rank")


def _best_config(trials: list[dict], variant: str, task: str) -> dict[float, list[dict]] | None:
    """lr -> seeds of ``variant`` on ``task`` in its most-run configuration (other options equal)."""
    groups = [by_lr for (t, _, _, _), by_lr in _family(trials, (variant,), ()).items() if t == task]
    return max(groups, key=lambda g: sum(map(len, g.values()))) if groups else None


def check_lora_baselines(trials: list[dict]) -> Verdict:
    """LoRA at r=8 on W_q, W_v (its Table 2 row; the rank sweep's r=8 cell) against full fine-tuning,
    each at its best rate; a non-inferiority test with the margin :data:`COMPARABLE` (LoRA not below
    by more than 2 SE, and the interval's lower end within the margin). The other baselines are
    reported beside them."""
    fam = _family(trials, ("lora",), ("rank",))
    loras = {(task, int(json.loads(rank))): by_lr for (task, _, rest, (rank,)), by_lr in fam.items()
             if {"query", "value"} <= set(json.loads(rest).get("targets") or ())}
    tasks = sorted({task for task, _ in loras if _best_config(trials, "full_ft", task)})
    if not tasks:
        return Verdict(NOT_RUN, "", "no full fine-tuning and LoRA-on-query/value trials on the same task")
    task = tasks[0]
    rank = 8 if (task, 8) in loras else max((r for t, r in loras if t == task), key=lambda r: len(loras[(task, r)]))
    lora, ft = loras[(task, rank)], _best_config(trials, "full_ft", task)
    (llr, ls), (flr, fs) = best(lora), best(ft)
    d, se = diff(ls, fs)
    parts = [f"{task}: LoRA r={rank} {fmt(ls)} at {llr:g}", f"full_ft {fmt(fs)} at {flr:g}: LoRA {d:+.3f} ± {se:.3f}"]
    for b in BASELINES:
        by_lr = _best_config(trials, b, task) if b != "full_ft" else None
        if by_lr:
            blr, bs = best(by_lr)
            parts.append(f"{b} {fmt(bs)} at {blr:g} ({diff(bs, ls)[0]:+.3f})")
    ours = "; ".join(parts)
    why = _not_tuned(lora, f"LoRA r={rank}") or _not_tuned(ft, "full fine-tuning") or _not_learned(lora[llr])
    if why:
        return Verdict(UNTESTABLE, ours, why)
    if not math.isfinite(se):
        return Verdict(UNTESTABLE, ours, _seed_reason(min(ls[2], fs[2])))
    if d + Z * se < 0:
        return Verdict(FAILS, ours, "LoRA's best is below full fine-tuning's by more than 2 SE")
    if d - Z * se >= -COMPARABLE:
        return Verdict(HOLDS, ours, f"LoRA's best is not below full fine-tuning's by more than {COMPARABLE:g} "
                                    f"(2-SE lower bound {d - Z * se:+.3f})")
    return Verdict(UNTESTABLE, ours, f"the 2-SE interval {d - Z * se:+.3f}..{d + Z * se:+.3f} holds both parity "
                                     f"and a gap beyond {COMPARABLE:g}: more seeds needed")


FINDINGS: list[Finding] = [
    Finding("lr_dominates", "The learning rate dominates", "unified study, Finding 5 (Sec. IV-B), Fig. 9",
            "a variant's score moves more across learning rates than the variants' best scores differ",
            "GLUE average (RoBERTa-base, 7 rates): the 20 variants' bests span 75.8-81.4 (5.6 points); a variant's "
            "score moves by a median of 45.6 points across the rates (LoRA 34.2-79.7)", "paper", check_lr_dominates),
    Finding("gradient_flow", "Initialization variants win at low rates and collapse at high ones",
            "unified study, Sec. IV NLU (Fig. 9), NLG (GSM8K)",
            "EVA, PiSSA, LoRA-GA, LoRA-One, NZLoRA, LoRA+ and MeLoRA beat LoRA at small rates and lose that lead "
            "at large ones",
            "GLUE at 1e-5 (LoRA's best / 10): all 7 above LoRA's 69.8 (71.6-78.4); at 5e-4 (5x LoRA's best) none "
            "above LoRA's 68.7 by more than 0.3 points, five at 34-46. GSM8K at 1e-6: LoRA-GA 64.1 vs LoRA 52.8",
            "paper", check_gradient_flow),
    Finding("tuned_lora", "Tuned LoRA matches the best variant", "unified study, Key Finding (Sec. IV-C)",
            "with its learning rate tuned, LoRA is within 0.08 points of the best variant",
            "GSM8K: best variant LoRA+ 75.59 vs LoRA 75.51 at 1e-4 (+0.08); GLUE: only RaSA clearly above "
            "LoRA (81.37 vs 79.66)", "paper", check_tuned_lora),
    Finding("collapse", "Which variants collapse at 5x LoRA's best rate", "unified study, Table VIII (GLUE, 5e-4)",
            "the enhanced-gradient variants collapse 5x above LoRA's best rate, the structured ones do not",
            "GLUE at 5e-4 (LoRA's best 1e-4; collapse = lost over half the gain over 33): "
            + ", ".join(sorted(paper_collapsed())) + " collapse; HiRA, RaSA, AdaLoRA, RandLoRA, ReLoRA, DoRA, "
            "DeLoRA, MoSLoRA stay at 77-81", "paper", check_collapse),
    Finding("structured_rate", "Structured forms need 10-1000x LoRA's rate", "unified study, Sec. IV NLU",
            "AdaLoRA, DoRA, DeLoRA and HiRA peak at learning rates 10-1000x LoRA's",
            "GLUE: HiRA, AdaLoRA, DeLoRA peak at 1e-3 (10x LoRA's 1e-4), DoRA at 1e-4 (1x); HiRA at 1e-5 is "
            "16.6 points below LoRA", "paper", check_structured_rate),
    Finding("dora_memory", "DoRA's memory", "unified study, Finding 1, Table II",
            "DoRA needs the most memory of the variants",
            "Llama-3.1-8B, H200, seq 1024: DoRA 52,847 MB vs LoRA 30,067 MB (+75%)", "paper", check_dora_memory),
    Finding("droplora_gain", "Rank dropout beats LoRA", "DropLoRA, Tables 1-4",
            "LoRA with rank dropout beats LoRA by 0.5-0.8 points on average",
            "LLaMA2-7B commonsense +0.53, LLaMA3-8B +0.83; math +0.70/+0.58; code +2.28/+1.03", "droplora",
            check_droplora_gain),
    Finding("droplora_best", "Best rank dropout 0.3", "DropLoRA, Fig. 2",
            "of the pruning rates 0.1-0.5, 0.3 gives the largest gain over LoRA",
            "best at 0.3 on commonsense, math and code; 0.5 below LoRA on math and code", "droplora",
            check_droplora_best),
    Finding("lorma_par", "LoRMA on par with LoRA", "LoRMA, Tables 2-4",
            "LoRMA+ and LoRMA-pi reach LoRA's scores",
            "e.g. RoBERTa-base GLUE and GPT-2 E2E: within about a point of LoRA, above it on some tasks", "lorma",
            check_lorma_par),
    Finding("lorma_auc", "LoRMA converges faster", "LoRMA, Table 5",
            "the area under the training-loss curve is 30-52% lower than LoRA's",
            "AUC 30.21% (SST-2) and 51.97% (CoLA) lower than LoRA's (RoBERTa-base)", "lorma", check_lorma_auc),
    Finding("lorma_order", "LoRMA pre- and post-multiplication comparable", "LoRMA, Sec. 5.3, Table 7",
            "LoRMA+ with W0·M (post) performs almost as with M·W0 (pre)",
            "RoBERTa: MRPC 92.5 vs 92.9, STS-B 91.8 vs 92.2, RTE 86.3 vs 86.6 (post vs pre)", "lorma",
            check_lorma_order),
    Finding("lora_rank1", "Rank 1 suffices on W_q, W_v", "LoRA, Table 6",
            "adapting W_q and W_v, rank 1 scores as well as ranks 2-64",
            "GPT-3 on W_q, W_v: WikiSQL r=1 73.4 vs best 73.8 (r=8); MultiNLI 91.3 vs 91.6 (r=8)", "lora_paper",
            check_lora_rank),
    Finding("lora_baselines", "LoRA on par with full fine-tuning", "LoRA, Tables 2-4",
            "LoRA (r=8 on W_q, W_v) performs on par with or better than full fine-tuning, and above BitFit, "
            "prefix tuning and adapters",
            "RoBERTa-base GLUE average: FT 86.4, BitFit 85.2, Adpt^D 84.4/85.4, LoRA 87.2; GPT-3 WikiSQL: FT 73.8, "
            "BitFit 71.3, PreEmbed 63.1, PreLayer 70.1, Adapter^H 71.9/73.2, LoRA 73.4", "lora_paper",
            check_lora_baselines),
    Finding("lora_subspace", "Subspace similarity of r=8 and r=64", "LoRA, Eq. 4, Figs. 3-4",
            "the top directions of A_{r=8} lie in A_{r=64} (phi > 0.5 for dimension 1); seeds share few",
            "GPT-3 layer 48, W_q and W_v", "lora_paper", W.check_subspace),
    Finding("lora_amplification", "Amplification factor", "LoRA, Table 7",
            "ΔW amplifies directions of W that W does not emphasize",
            "r=4: ||ΔW||_F / ||U^T W V^T||_F = 6.91/0.32 = 21.6; r=64: 3.57/1.90 = 1.9", "lora_paper",
            W.check_amplification),
    Finding("lorma_rank", "Rank of LoRMA's ΔW", "LoRMA, Table 15",
            "ΔW has rank at most r for LoRA and LoRMA+, almost full for LoRMA-π",
            "RoBERTa-large layer 13, CoLA, r=8: LoRA 8, LoRMA+ 8, LoRMA-π 1021 (of 1024)", "lorma",
            W.check_lorma_rank),
    Finding("lorma_correlation", "LoRMA's ΔW correlates with LoRA's", "LoRMA, Table 9",
            "ΔW of LoRMA+ and LoRMA-π is aligned with LoRA's ΔW, compared to a random matrix",
            "RoBERTa-large layers 3/23: cosine 0.074/0.068 (LoRMA+), 0.004/0.0003 (LoRMA-π), random 1e-4",
            "lorma", W.check_lorma_correlation),
]


def evaluate(trials: list[dict]) -> list[tuple[Finding, Verdict]]:
    """Every finding's verdict on a study's trial rows (a check that raises says so as its reason)."""
    out = []
    for f in FINDINGS:
        try:
            v = f.check(trials)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            v = Verdict(UNTESTABLE, "", f"the check failed: {type(e).__name__}: {e}")
        out.append((f, v))
    return out


def markdown(trials: list[dict]) -> str | None:
    """The report's "Findings" section, or None when no finding has trials to look at."""
    results = evaluate(trials)
    if all(v.verdict == NOT_RUN for _, v in results):
        return None
    ran = [(f, v) for f, v in results if v.verdict != NOT_RUN]
    lines = ["## Findings", "",
             f"Each claim beside the paper's numbers. Cells are mean ± sd over seeds; a difference counts when it "
             f"exceeds {Z:g} standard errors (of the seed-by-seed differences where both cells ran the same seeds, "
             f"else pooled); comparisons need {MIN_SEEDS}+ seeds per cell. The claims this study has no trials "
             f"for are listed last, with the suite that runs them.", "",
             "| finding | source | verdict |", "|---|---|---|"]
    lines += [f"| {f.title} | {f.source} | **{v.verdict}** |" for f, v in ran]
    lines.append("")
    for f, v in ran:
        lines += [f"### {f.title}: {v.verdict}", "", f"- Claim: {f.claim}.", f"- Paper: {f.paper}.",
                  f"- Here: {v.ours}." if v.ours else "- Here: –", f"- Why: {v.reason}.", ""]
    missing = [(f, v) for f, v in results if v.verdict == NOT_RUN]
    if missing:
        lines += ["### Not run in this study", ""]
        lines += [f"- {f.title} ({f.source}): {v.reason} (`lorazoo study --suite {f.suite}`)." for f, v in missing]
        lines.append("")
    return "\n".join(lines)
