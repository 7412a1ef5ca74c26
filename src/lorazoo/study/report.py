"""Tables and plots from a study file: metric against learning rate (one line per variant, per
task), best learning rate and score per variant, loss curves, the normalized area under the
training-loss curve (LoRMA's convergence measure; lower converges faster), and a "Findings"
section with the papers' claims and their verdicts on this study's trials (``findings.py``).
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from ..analysis.curves import loss_auc
from .errors import StudyError
from .store import Store
from .summary import FIXED_AXES, _mean, _sd, best_rows, summarize

LINESTYLES = ("-", "--", ":")


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _linestyle(i: int) -> str:
    """Line style of the i-th line: matplotlib's colours repeat after 10, so the style changes."""
    return LINESTYLES[i // 10 % len(LINESTYLES)]


def _save(fig, ax, path: Path) -> str:
    """Grid, legend, tight layout, write ``path`` as PNG, close; return the file name."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "task"


def markdown(study: dict, trials: list[dict], counts: dict, images: dict | None = None) -> str:
    """The report as Markdown; ``images`` maps (task, kind) to PNG file names to link."""
    s = summarize(trials)
    metric = next((t["metric_name"] for t in trials if t.get("metric_name")), "metric")
    parts = [f"# Study `{study['name']}`", "",
             "Trials: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ".", ""]
    for task, series in sorted(s["tasks"].items()):
        lrs = sorted({lr for by_lr in series.values() for lr in by_lr})
        rows = best_rows(series)
        first = next(t for by_lr in series.values() for ts in by_lr.values() for t in ts)
        fixed = {k: v for k, v in sorted(first["config"].items())
                 if k not in FIXED_AXES and k not in s["extra_axes"][task]}
        parts += [f"## {task}", ""]
        if fixed:
            parts += ["Every trial: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ".", ""]
        if s["extra_axes"][task]:
            parts += [f"Lines are variants split by {', '.join(s['extra_axes'][task])}.", ""]
        parts += [f"### Best learning rate and {metric} per variant", "",
                  _table(["variant", "best lr", metric, "sd", "seeds", "before", "loss AUC", "wall s",
                          "peak MB", "trainable"],
                         [[r["series"], f"{r['best_lr']:g}", _fmt(r["metric"]), _fmt(r["sd"]), str(r["seeds"]),
                           _fmt(r["before"]), _fmt(r["auc"]), _fmt(r["wall"], ".1f"), _fmt(r["peak"], ".0f"),
                           str(r["params"] if r["params"] is not None else "–")] for r in rows]), ""]
        for title, value in ((f"{metric} against learning rate (mean over seeds)", lambda ts: _mean(
                [t["metric"] for t in ts])), ("Loss AUC (normalized by steps) against learning rate",
                                              lambda ts: _mean([loss_auc(t["losses"]) for t in ts]))):
            parts += [f"### {title}", "",
                      _table(["variant", *(f"{lr:g}" for lr in lrs)],
                             [[r["series"], *(_fmt(value(series[r["series"]][lr])) if lr in series[r["series"]]
                                              else "" for lr in lrs)] for r in rows]), ""]
        for kind, alt in (("metric_vs_lr", f"{metric} against learning rate"), ("loss", "loss curves")):
            if images and (task, kind) in images:
                parts += [f"![{task}: {alt}]({images[(task, kind)]})", ""]
    from .findings import markdown as findings_markdown

    section = findings_markdown(trials)  # the papers' claims checked, when the study has their trials
    if section:
        parts += [section, ""]
    failed = [t for t in trials if t["status"] == "failed"]
    if failed:
        parts += ["## Failed trials", "",
                  _table(["trial", "config", "error"],
                         [[t["id"], " ".join(f"{k}={v}" for k, v in t["config"].items()),
                           ((t["error"] or "").strip().splitlines() or [""])[-1][:160].replace("|", "/")]
                          for t in failed]), ""]
    return "\n".join(parts)


def plots(trials: list[dict], out_dir: Path) -> dict:
    """PNG plots per task; returns {(task, kind): file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(trials)
    metric = next((t["metric_name"] for t in trials if t.get("metric_name")), "metric")
    images = {}
    for task, series in sorted(s["tasks"].items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, by_lr) in enumerate(sorted(series.items())):
            style = {"linestyle": _linestyle(i)}
            lrs = sorted(by_lr)
            ys = [_mean([t["metric"] for t in by_lr[lr]]) for lr in lrs]
            sds = [_sd([t["metric"] for t in by_lr[lr]]) for lr in lrs]
            if any(math.isfinite(x) for x in sds):
                ax.errorbar(lrs, ys, yerr=[x if math.isfinite(x) else 0 for x in sds], marker="o", capsize=3,
                            label=name, **style)
            else:
                ax.plot(lrs, ys, marker="o", label=name, **style)
        ax.set(xscale="log", xlabel="learning rate", ylabel=metric, title=f"{task}: {metric} against learning rate")
        images[(task, "metric_vs_lr")] = _save(fig, ax, out_dir / f"metric_vs_lr_{_slug(task)}.png")

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, row in enumerate(best_rows(series)):
            ts = series[row["series"]][row["best_lr"]]
            curve = next((t["losses"] for t in ts if t["losses"]), None)
            if curve:
                ax.plot(range(1, len(curve) + 1), curve, lw=1, alpha=0.85,
                        linestyle=_linestyle(i), label=f"{row['series']} (lr {row['best_lr']:g})")
        ax.set(xlabel="step", ylabel="training loss", title=f"{task}: loss at each variant's best lr")
        images[(task, "loss")] = _save(fig, ax, out_dir / f"loss_{_slug(task)}.png")
    return images


CSV_FIELDS = ("task", "variant", "lr", "seed", "status", "metric_name", "metric", "metric_before", "loss_auc",
              "wall_seconds", "train_seconds", "peak_rss_mb", "trainable_params", "attempts", "error", "config")


def write_csv(trials: list[dict], path: Path) -> None:
    """Every trial as one row (its full config as JSON in the last column): the study file, exported."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for t in trials:
            row = {**t, "loss_auc": loss_auc(t.get("losses")) if t["status"] == "done" else None,
                   "config": json.dumps(t["config"], sort_keys=True)}
            w.writerow(["" if row.get(k) is None else row.get(k) for k in CSV_FIELDS])


def report(db: str, out_dir: str | None = None, *, study: str | None = None, with_plots: bool = True) -> str:
    """Write ``report.md``, ``trials.csv`` (and PNG plots) for a study file into ``out_dir``; return the Markdown."""
    if not Path(db).is_file():
        raise StudyError(f"no study file at {db!r}")
    with Store(db, create=False) as store:
        info = store.study(study)
        trials = store.trials(info["name"])
        counts = store.counts(info["name"])
    if not any(t["status"] == "done" for t in trials):
        raise StudyError(f"study {info['name']!r} in {db} has no finished trial yet; run `lorazoo study` first")
    out = Path(out_dir) if out_dir else Path(db).with_name(Path(db).stem + "-report")
    out.mkdir(parents=True, exist_ok=True)
    images = plots(trials, out) if with_plots else None
    text = markdown(info, trials, counts, images)
    (out / "report.md").write_text(text)
    write_csv(trials, out / "trials.csv")
    return text
