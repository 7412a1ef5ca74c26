"""lorazoo analyze: the papers' analyses of trained adapters, on folders written by ``lorazoo train``.

    lorazoo analyze subspace RUN1 [RUN2 | --random]   φ(A1, A2, i, j) heatmaps (LoRA Eq. 4, Figs. 3-4)
    lorazoo analyze amplification RUN                  ‖ΔW‖_F / ‖Uᵀ W V‖_F (LoRA Table 7)
    lorazoo analyze spectrum RUN                       singular values, rank, effective rank of ΔW
    lorazoo analyze correlation RUN1 RUN2              ΔW1 against ΔW2 (LoRMA Table 9)
    lorazoo analyze auc RUN_OR_JSON...                 loss-curve AUC and % decrease vs the first (LoRMA Table 5)
    lorazoo analyze grad-rank RUN                      effective rank of dL/dW per layer (study Eq. 54)

Each prints a table (``--json``: the JSON instead); ``--out DIR`` writes ``DIR/<analysis>.json`` and
the plots (``subspace_<layer>.png``, ``spectrum.png``, ``auc.png``, ``grad_rank.png``). A RUN is
rebuilt as ``lorazoo eval`` does: a fresh base model of the task in RUN/task.json, the adapter loaded.
The numbers are computed by :mod:`lorazoo.analysis` (see its modules for the definitions).
"""
from __future__ import annotations

import json
import math
import sys

WHAT = ("subspace", "amplification", "spectrum", "correlation", "auc", "grad-rank")


def register(sub) -> None:
    p = sub.add_parser("analyze", help="the papers' analyses of saved adapters (subspaces, spectra, AUC...)",
                       description="Analyses of trained adapters from the papers, on folders written by "
                                   "`lorazoo train --out` (the model is rebuilt from the folder's task.json).")
    kinds = p.add_subparsers(dest="what", metavar="ANALYSIS")

    def common(q, runs: str, help_runs: str):
        q.add_argument("runs", nargs=runs, metavar="RUN", help=help_runs)
        q.add_argument("--out", default=None, metavar="DIR", help="write DIR/<analysis>.json and the plots")
        q.add_argument("--json", action="store_true", help="print the JSON instead of the table")
        q.set_defaults(func=main)

    def layers(q):
        q.add_argument("--modules", default=None, metavar="REGEX", help="only the adapted layers whose path matches")

    def shift(q):
        q.add_argument("--no-shift", action="store_true",
                       help="ΔW without the adapter's base shift (PiSSA's residual, ReLoRA's merges): the form's "
                            "own update only")

    q = kinds.add_parser("subspace", help="subspace similarity φ(i, j) between two adapters (LoRA Eq. 4, Figs. 3-4)",
                         description="φ(A1, A2, i, j) = ‖U1^iᵀ U2^j‖²_F / min(i, j), U the right-singular vectors of "
                                     "the A factors, for every i, j: RUN1's A_{r=8} against RUN2's A_{r=64} (Fig. 3), "
                                     "two seeds (Fig. 4), or --random (a Gaussian matrix, Fig. 4 right).")
    common(q, "+", "one or two run folders (one with --random)")
    layers(q)
    q.add_argument("--of", choices=("A", "delta"), default="A",
                   help="compare the A factors (the paper; forms with B·A factors) or ΔW's row space (any mergeable form)")
    q.add_argument("--random", action="store_true", help="compare RUN1 against a random Gaussian matrix")
    q.add_argument("--seed", type=int, default=0, help="seed of the random baseline")

    q = kinds.add_parser("amplification", help="amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F (LoRA Table 7)",
                         description="‖Uᵀ W V‖_F with U, V the top-r singular directions of ΔW, of W and random "
                                     "ones, ‖W‖_F, ‖ΔW‖_F, and the amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F (ΔW's).")
    common(q, 1, "a run folder")
    layers(q)
    shift(q)
    q.add_argument("--rank", type=int, default=None, help="r (default: ΔW's numerical rank, the adapter's rank for LoRA)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random directions")

    q = kinds.add_parser("spectrum", help="singular values, numerical and effective rank of ΔW",
                         description="Per layer: ΔW's singular values, numerical rank (tolerance rtol·σ_max, rtol = "
                                     "max(m, n)·eps by default), effective rank exp(H(σ/Σσ)) and stable rank.")
    common(q, 1, "a run folder")
    layers(q)
    shift(q)
    q.add_argument("--rtol", type=float, default=None, help="relative rank tolerance (default max(m, n)·eps)")
    q.add_argument("--top", type=int, default=16, help="singular values listed per layer (default 16; all in --out)")

    q = kinds.add_parser("correlation", help="ΔW of two adapters compared (LoRMA Table 9)",
                         description="‖ΔW1 − ΔW2‖_F, cosine of the flattened ΔW, squared differences of the top-r "
                                     "singular values and eigenvalues, and the largest principal angle Θ_1 between "
                                     "the column spaces.")
    common(q, 2, "two run folders on the same model")
    layers(q)
    shift(q)
    q.add_argument("--rank", type=int, default=None, help="r of the top-r comparisons (default: the smaller rank)")

    q = kinds.add_parser("auc", help="area under the training-loss curve (LoRMA Table 5)",
                         description="Normalized AUC of each run's training loss (steps rescaled to [0, 1]: the mean "
                                     "loss), and its % decrease against the first run.")
    common(q, "+", "run folders (metrics.json or result.json) or JSON files with a 'losses' list")

    q = kinds.add_parser("grad-rank", help="effective rank of the gradients dL/dW (study Eq. 54, RaLoRA)",
                         description="Per adapted layer, erank(G) = exp(H(σ/Σσ)) of G = dL/dW averaged over a few "
                                     "training batches of the run's task.")
    common(q, 1, "a run folder")
    layers(q)
    q.add_argument("--at", choices=("base", "adapted"), default="base",
                   help="gradient at the pre-trained model (RaLoRA's, default) or with the adapter")
    q.add_argument("--batches", type=int, default=8, help="training batches averaged (default 8)")
    q.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p) -> int:
    p.print_help()
    return 0


def main(args) -> int:
    from ..errors import LorazooError

    for flag in ("batches", "batch_size", "top", "rank"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise LorazooError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if getattr(args, "rtol", None) is not None and not (args.rtol >= 0 and math.isfinite(args.rtol)):
        raise LorazooError(f"--rtol must be a finite number >= 0, got {args.rtol}")
    result, table, plots = RUNNERS[args.what](args)
    result = {"analysis": args.what, **result}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(table)
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise LorazooError(f"--out {args.out!r} is a file; give a folder")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.what.replace('-', '_')}.json").write_text(json.dumps(result, indent=1))
        written = _plot(plots, out)
        print(f"written: {out / (args.what.replace('-', '_') + '.json')}"
              + (f" and {len(written)} plot(s)" if written else ""), file=sys.stderr if args.json else sys.stdout)
    return 0


# --- the analyses --------------------------------------------------------------------------------
def _load(folder):
    from ..analysis import load_run

    return load_run(folder)


def _subspace(args):
    from ..analysis import subspace_by_layer
    from ..errors import LorazooError

    if args.random and len(args.runs) != 1:
        raise LorazooError("--random compares one run with a random matrix; give one RUN")
    if not args.random and len(args.runs) != 2:
        raise LorazooError(f"subspace compares two runs (or one with --random); got {len(args.runs)}")
    h1 = _load(args.runs[0])[1]
    h2 = None if args.random else _load(args.runs[1])[1]
    layers = subspace_by_layer(h1, h2, of=args.of, modules=args.modules, seed=args.seed)
    second = "random" if args.random else args.runs[1]
    rows = [[p, "x".join(map(str, v["shape1"])), "x".join(map(str, v["shape2"])), v["phi_1_1"], v["phi_full"],
             v["phi_mean"]] for p, v in layers.items()]
    table = _table(["layer", f"{args.of} (1)", f"{args.of} (2)", "φ(1,1)", "φ(r1,r2)", "mean φ"], rows)
    plots = [("heatmap", f"subspace_{_safe(p)}.png", p, v, args.runs[0], second) for p, v in layers.items()]
    return {"runs": [args.runs[0], second], "of": args.of, "layers": layers}, table, plots


def _amplification(args):
    from ..analysis import amplification_by_layer

    h = _load(args.runs[0])[1]
    layers = amplification_by_layer(h, r=args.rank, modules=args.modules, seed=args.seed,
                                    include_shift=not args.no_shift)
    rows = [[p, v["r"], v["norm_weight"], v["norm_delta"], v["proj_delta"], v["proj_weight"], v["proj_random"],
             v["amplification"]] for p, v in layers.items()]
    table = _table(["layer", "r", "‖W‖_F", "‖ΔW‖_F", "‖UᵀWV‖ ΔW", "‖UᵀWV‖ W", "‖UᵀWV‖ random", "amplification"], rows)
    return {"runs": args.runs, "layers": layers}, table, []


def _spectrum(args):
    from ..analysis import spectrum_by_layer

    h = _load(args.runs[0])[1]
    layers = spectrum_by_layer(h, rtol=args.rtol, modules=args.modules, include_shift=not args.no_shift)
    rows = [[p, "x".join(map(str, v["shape"])), v["rank"], v["effective_rank"], v["stable_rank"],
             " ".join(f"{s:.3g}" for s in v["singular_values"][:args.top])] for p, v in layers.items()]
    table = _table(["layer", "shape", "rank", "eff. rank", "stable rank", f"σ (top {args.top})"], rows)
    return {"runs": args.runs, "layers": layers}, table, [("spectrum", "spectrum.png", layers, args.runs[0])]


def _correlation(args):
    from ..analysis import correlation_by_layer

    h1, h2 = _load(args.runs[0])[1], _load(args.runs[1])[1]
    layers = correlation_by_layer(h1, h2, r=args.rank, modules=args.modules, include_shift=not args.no_shift)
    rows = [[p, v["r"], v["frobenius_distance"], v["cosine"], v["singular_value_ssd"], v["eigenvalue_ssd"],
             v["max_angle"]] for p, v in layers.items()]
    table = _table(["layer", "r", "‖ΔW1−ΔW2‖_F", "cos", "(·,·)_S^r", "(·,·)_E^r", "Θ_1 (rad)"], rows)
    return {"runs": args.runs, "layers": layers}, table, []


def _auc(args):
    from ..analysis import auc_reduction, loss_auc

    curves = {path: _losses(path) for path in args.runs}
    first = loss_auc(next(iter(curves.values())))
    runs = {p: {"steps": len(c), "auc": loss_auc(c), "auc_decrease_pct": auc_reduction(loss_auc(c), first)}
            for p, c in curves.items()}
    rows = [[p, v["steps"], v["auc"], v["auc_decrease_pct"]] for p, v in runs.items()]
    table = _table(["run", "steps", "loss AUC", f"% decrease vs {args.runs[0]}"], rows)
    return {"runs": runs, "reference": args.runs[0]}, table, [("curves", "auc.png", curves)]


def _losses(path) -> list:
    from pathlib import Path

    from ..errors import LorazooError

    p = Path(path)
    if p.is_dir():
        files = [p / "metrics.json", p / "result.json"]
        f = next((f for f in files if f.is_file()), None)
        if f is None:
            raise LorazooError(f"{path!r} holds neither metrics.json nor result.json; give a folder written by "
                               f"`lorazoo train --out` or a JSON file with a 'losses' list")
    elif p.is_file():
        f = p
    else:
        raise LorazooError(f"{path!r} does not exist")
    try:
        data = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LorazooError(f"{f} is not valid JSON ({e})") from None
    losses = data.get("losses") if isinstance(data, dict) else data
    if not isinstance(losses, list) or not losses or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses):
        raise LorazooError(f"{f} holds no loss curve (a non-empty 'losses' list of numbers)")
    return [float(x) for x in losses]


def _grad_rank(args):
    from ..analysis import gradient_spectra
    from ..analysis.adapters import _select

    model, h, task = _load(args.runs[0])
    batches = task.calibration_batches(n_batches=args.batches, batch_size=args.batch_size)
    layers = _select(gradient_spectra(model, h, batches, at=args.at, top=8), args.modules)
    rows = [[p, "x".join(map(str, v["shape"])), v["effective_rank"], v["rank"], v["max_rank"]]
            for p, v in layers.items()]
    table = _table(["layer", "shape", "erank(dL/dW)", "rank", "max rank"], rows)
    return ({"runs": args.runs, "at": args.at, "batches": len(batches), "layers": layers}, table,
            [("bars", "grad_rank.png", {p: v["effective_rank"] for p, v in layers.items()}, args.at)])


RUNNERS = {"subspace": _subspace, "amplification": _amplification, "spectrum": _spectrum,
           "correlation": _correlation, "auc": _auc, "grad-rank": _grad_rank}


# --- output --------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    last = len(header) - 1  # a first or a list-valued last column reads left-aligned, numbers right-aligned
    lines = ["  ".join(c.ljust(w) if i == 0 or (i == last and " " in "".join(x[last] for x in cells[1:])) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _safe(path: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in path)


def _plot(plots: list, out) -> list:
    """Write the plots; [] without matplotlib (the JSON holds every number)."""
    if not plots:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lorazoo analyze: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    for kind, name, *data in plots:
        fig = _FIGURES[kind](plt, *data)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def _heatmap(plt, path, v, run1, run2):
    """The paper's Figs. 3-4: φ(i, j), i (rows) over the first adapter's directions, j over the second's."""
    grid = v["grid"]
    fig, ax = plt.subplots(figsize=(min(10, 2.5 + 0.12 * len(grid[0])), min(8, 1.8 + 0.25 * len(grid))))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto",
                   extent=(0.5, len(grid[0]) + 0.5, 0.5, len(grid) + 0.5))
    ax.set_xlabel(f"j ({run2})")
    ax.set_ylabel(f"i ({run1})")
    ax.set_title(f"φ(i, j)  {path}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def _spectrum_plot(plt, layers, run):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for p, v in layers.items():
        s = [x for x in v["singular_values"] if x > 0]
        if s:
            ax.semilogy(range(1, len(s) + 1), s, marker=".", lw=0.8, label=p)
    ax.set_xlabel("k")
    ax.set_ylabel("σ_k(ΔW)")
    ax.set_title(f"singular values of ΔW: {run}", fontsize=9)
    if len(layers) <= 12:
        ax.legend(fontsize=6)
    return fig


def _curves(plt, curves):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for p, c in curves.items():
        xs = [i / max(1, len(c) - 1) for i in range(len(c))]
        ax.plot(xs, c, lw=0.9, label=p)
    ax.set_xlabel("training progress (steps rescaled to [0, 1])")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    return fig


def _bars(plt, values, at):
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(values) + 2), 3.6))
    ax.bar(range(len(values)), list(values.values()))
    ax.set_xticks(range(len(values)), list(values), rotation=90, fontsize=6)
    ax.set_ylabel("erank(dL/dW)")
    ax.set_title(f"effective rank of the gradients (at the {at} model)", fontsize=9)
    return fig


_FIGURES = {"heatmap": _heatmap, "spectrum": _spectrum_plot, "curves": _curves, "bars": _bars}
