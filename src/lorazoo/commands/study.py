"""lorazoo study: run a grid of trials (tasks x variants x learning rates x seeds x ...), each in
its own process, recorded in one SQLite file; rerun to resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LorazooError


def _value(text: str):
    """A command-line value: JSON if it parses (numbers, lists, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: list[str] | None, what: str) -> dict:
    out = {}
    for item in items or []:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise LorazooError(f"{what} takes KEY=VALUE, got {item!r}")
        out[key] = _value(val)
    return out


def register(sub) -> None:
    p = sub.add_parser("study", help="run a grid of trials, resumable, recorded in SQLite",
                       description="Run a study: every combination of the grid, each trial in a fresh "
                                   "process, recorded in one SQLite file. Rerunning skips finished trials "
                                   "and retries unfinished ones.")
    src = p.add_argument_group("what to run (a suite, a JSON config, or the grid flags)")
    src.add_argument("--suite", help="a named suite (see --list-suites)")
    src.add_argument("--config", help="a study config JSON file (keys: name, trial_fn, grid, fixed, sweeps)")
    src.add_argument("--tasks", nargs="+", metavar="TASK")
    src.add_argument("--variants", nargs="+", metavar="VARIANT", help="variant names, or 'all'")
    src.add_argument("--lrs", nargs="+", type=float, metavar="LR")
    src.add_argument("--seeds", nargs="+", type=int, metavar="SEED")
    src.add_argument("--epochs", type=float)
    src.add_argument("--batch-size", type=int)
    src.add_argument("--limit", type=int, help="training examples per trial")
    src.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="another axis, e.g. rank=4,8,16")
    src.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="a constant for every trial (spec field, part, task or trainer option)")
    src.add_argument("--trial-fn", help="the trial function, 'module:function' (default lorazoo.run:run)")
    src.add_argument("--name", help="the study's name in the file (default: the suite's, or 'study')")
    p.add_argument("--db", help="the study file (default runs/<name>.sqlite)")
    p.add_argument("--workers", type=int, default=1, help="trials at once, local backend (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per trial (default cores / workers)")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--cpus-per-trial", type=float, default=1, help="Ray CPUs per trial (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="steps between each trial's checkpoints, in DB.trials/<trial>, so a killed trial "
                        "resumes where it was (default 50; 0: off)")
    p.add_argument("--timeout", type=float, help="seconds before a trial is killed and marked failed")
    p.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="leave failed trials alone on a rerun")
    p.add_argument("--force", action="store_true", help="run even if the file says another runner holds it")
    p.add_argument("--dry-run", action="store_true", help="validate and list the trials; run nothing")
    p.add_argument("--list-suites", action="store_true", help="list the named suites and exit")
    p.set_defaults(func=run)


def build_config(args) -> dict:
    """The study config from --suite, --config and the grid flags (flags extend or override)."""
    from ..study.suites import suite

    if args.suite and args.config:
        raise LorazooError("give --suite or --config, not both")
    if args.suite:
        config = suite(args.suite)
    elif args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except OSError as e:
            raise LorazooError(f"cannot read the study config {args.config!r} ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise LorazooError(f"the study config {args.config!r} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise LorazooError(f"the study config {args.config!r} must be a JSON object")
    else:
        config = {}
    grid = {}
    for key, val in (("task", args.tasks), ("variant", args.variants), ("lr", args.lrs), ("seed", args.seeds)):
        if val:
            grid[key] = "all" if key == "variant" and val == ["all"] else val
    for key, val in _pairs(args.grid, "--grid").items():
        grid[key] = [_value(v) for v in str(val).split(",")] if not isinstance(val, list) else val
    fixed = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("limit", args.limit))
             if v is not None}
    fixed.update(_pairs(args.set, "--set"))
    if grid or fixed:
        sweeps = config.pop("sweeps", None) or ([{"grid": config.pop("grid", {}), "fixed": config.pop("fixed", {})}]
                                                 if ("grid" in config or "fixed" in config) else [{}])
        config.pop("grid", None), config.pop("fixed", None)
        for sw in sweeps:  # flags apply to every sweep
            g = {k: v for k, v in (sw.get("grid") or {}).items() if k not in fixed}
            f = {k: v for k, v in (sw.get("fixed") or {}).items() if k not in grid}
            sw["grid"], sw["fixed"] = {**g, **grid}, {**f, **fixed}
        config["sweeps"] = sweeps
    if not config:
        raise LorazooError("nothing to run: give --suite NAME, --config FILE, or --tasks/--variants/--lrs "
                           "(see lorazoo study --help)")
    if args.trial_fn:
        config["trial_fn"] = args.trial_fn
    if args.name:
        config["name"] = args.name
    return config


def run(args) -> int:
    from ..study.grid import label, normalize_study, validate
    from ..study.runner import run_study
    from ..study.suites import SUITES

    if args.list_suites:
        for name, s in sorted(SUITES.items()):
            print(f"{name}: {s.get('description', '')}")
        return 0
    config = normalize_study(build_config(args))
    db = args.db or str(Path("runs") / f"{config['name']}.sqlite")
    if args.dry_run:
        trials = validate(config)
        for cfg in trials:
            print(label(cfg), json.dumps({k: v for k, v in cfg.items() if k not in ("task", "variant", "lr", "seed")}))
        print(f"{len(trials)} trials would be recorded in {db}")
        return 0
    try:
        counts = run_study(db, config, workers=args.workers, backend=args.backend, threads=args.threads,
                           timeout=args.timeout, retry_failed=args.retry_failed, ray_address=args.ray_address,
                           cpus_per_trial=args.cpus_per_trial, force=args.force,
                           **({} if args.checkpoint_every is None else {"checkpoint_every": args.checkpoint_every}),
                           log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are kept in {db}; run the same command to resume",
              file=sys.stderr)
        return 130
    print(f"results in {db}; tables and plots: lorazoo report {db}")
    return 1 if counts.get("failed") else 0
