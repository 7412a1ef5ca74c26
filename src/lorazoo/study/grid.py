"""Study grids: a study config expanded into trials, validated before any trial runs.

A study config is a JSON-able dict::

    {"name": "demo", "trial_fn": "lorazoo.run:run",
     "sweeps": [{"grid":  {"task": ["sentiment"], "variant": ["lora", "dora"],
                           "lr": [1e-4, 1e-3], "seed": [0, 1], "rank": [4, 8]},
                 "fixed": {"epochs": 1, "limit": 2000, "max_length": 64}}]}

Each sweep is the cartesian product of its ``grid`` lists, plus the constants in ``fixed``; the
study is the union of its sweeps (a top-level ``grid``/``fixed`` is one sweep). ``variant: "all"``
means every registered variant. A trial's config is a flat dict routed when it runs:

* ``task``, ``variant``, ``lr`` (required), ``epochs``, ``batch_size``, ``limit``, ``seed`` (default
  0; it also seeds the adapter), ``quantize`` (QLoRA's base: "nf4"...) go to the trial function as
  arguments;
* AdapterSpec fields and options of the variant's parts (``rank``, ``alpha``, ``loraplus_ratio``...)
  override the variant's preset;
* anything else is a task or trainer option (``max_length``, ``lr_schedule``...);
* except the study's own options (:data:`STUDY_OPTIONS`), read by the runner and never passed on:
  ``keep_adapter: true`` keeps the trial's saved adapter in ``<db>.adapters/<trial id>`` (see
  ``runner.adapter_dir``) for analyses that need it, instead of deleting the trial's folder.

A trial's id is a stable hash of its config, so rerunning a study finds its finished trials.
"""
from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import math
from typing import Any, Callable, Iterable

from .errors import GridError

DEFAULT_TRIAL_FN = "lorazoo.run:run"
RUN_KEYS = ("epochs", "batch_size", "limit", "seed", "quantize")
AXIS_ORDER = ("task", "variant", "lr", "seed")
STUDY_OPTIONS = ("keep_adapter",)  # trial config keys the runner reads; not passed to the trial function
_SWEEP_KEYS = {"grid", "fixed"}
_STUDY_KEYS = {"name", "description", "trial_fn", "sweeps", "grid", "fixed"}
MAX_PROBLEMS = 12


def normalize_study(config: dict) -> dict:
    """The study config with defaults filled in and a top-level grid turned into ``sweeps``."""
    if not isinstance(config, dict):
        raise GridError(f"a study config must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - _STUDY_KEYS)
    if unknown:
        raise GridError(f"unknown key(s) {', '.join(unknown)} in the study config; "
                        f"it takes: {', '.join(sorted(_STUDY_KEYS))}")
    sweeps = list(config.get("sweeps") or [])
    if "grid" in config or "fixed" in config:
        sweeps.insert(0, {k: config[k] for k in ("grid", "fixed") if k in config})
    if not sweeps:
        raise GridError("the study has no sweeps: give 'grid' (and 'fixed') or a list of 'sweeps'")
    name = config.get("name", "study")
    if not isinstance(name, str) or not name.strip():
        raise GridError(f"the study name must be a non-empty string, got {name!r}")
    fn = config.get("trial_fn", DEFAULT_TRIAL_FN)
    if not isinstance(fn, str) or fn.count(":") != 1:
        raise GridError(f"trial_fn must be 'module:function', got {fn!r}")
    out = {"name": name, "trial_fn": fn, "sweeps": []}
    if config.get("description"):
        out["description"] = str(config["description"])
    for i, sw in enumerate(sweeps):
        if not isinstance(sw, dict) or set(sw) - _SWEEP_KEYS:
            raise GridError(f"sweep {i + 1} must be an object with 'grid' and/or 'fixed', got {sw!r}")
        grid, fixed = dict(sw.get("grid") or {}), dict(sw.get("fixed") or {})
        for key, values in grid.items():
            if key == "variant" and values == "all":
                continue
            if not isinstance(values, list) or not values:
                raise GridError(f"sweep {i + 1}: grid axis {key!r} must be a non-empty list of values "
                                f"(put constants in 'fixed'), got {values!r}")
        both = sorted(set(grid) & set(fixed))
        if both:
            raise GridError(f"sweep {i + 1}: {', '.join(both)} both in 'grid' and 'fixed'")
        out["sweeps"].append({"grid": grid, "fixed": fixed})
    return out


def expand(config: dict) -> list[dict]:
    """Every trial config of the study, in grid order, without duplicates."""
    study = normalize_study(config)
    trials, seen = [], set()
    for sw in study["sweeps"]:
        grid = dict(sw["grid"])
        if grid.get("variant") == "all":
            from ..variants import variants

            grid["variant"] = variants()
        keys = [k for k in AXIS_ORDER if k in grid] + sorted(k for k in grid if k not in AXIS_ORDER)
        for values in itertools.product(*(grid[k] for k in keys)):
            cfg = canonical({**sw["fixed"], **dict(zip(keys, values))})
            tid = trial_id(cfg)
            if tid not in seen:
                seen.add(tid)
                trials.append(cfg)
    return trials


def canonical(cfg: dict) -> dict:
    """A trial config with its defaults and number types fixed (so equal trials hash equal)."""
    cfg = {"seed": 0, **cfg}
    for key in ("lr", "epochs"):
        if isinstance(cfg.get(key), int) and not isinstance(cfg[key], bool):
            cfg[key] = float(cfg[key])
    return dict(sorted(cfg.items()))


def trial_id(cfg: dict) -> str:
    """A stable 16-hex-digit hash of a trial config (key order does not matter)."""
    text = json.dumps(canonical(cfg), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_trial_fn(path: str) -> Callable[..., dict]:
    """The function named by ``"module:function"``."""
    mod_name, _, fn_name = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise GridError(f"cannot import the trial function's module {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise GridError(f"module {mod_name!r} has no function {fn_name!r} (trial_fn={path!r})")
    return fn


def call_args(cfg: dict) -> tuple[str, Any, dict]:
    """``(task, spec, kwargs)`` for ``trial_fn(task, spec, **kwargs)`` from a trial config."""
    from ..spec import AdapterSpec

    rest = {k: v for k, v in canonical(cfg).items() if k not in STUDY_OPTIONS}
    task, variant = rest.pop("task"), rest.pop("variant")
    base = AdapterSpec.preset(variant)
    spec_keys = set(base.to_dict()) - {"seed"}
    overrides = {k: rest.pop(k) for k in sorted(rest) if k in spec_keys}
    spec = AdapterSpec.preset(variant, seed=rest["seed"], **overrides)
    return task, spec, rest


# run() keywords that do not change the model or test split the "before" evaluation sees
NOT_BEFORE = ("lr", "epochs", "checkpoint_every", "progress")


def before_key(cfg: dict) -> str:
    """Trials with equal keys evaluate the same base model on the same test split before training
    (same task, seed, task options and quantization; the adapter and training options left out)."""
    from ..run import TRAINER_OPTIONS

    task, _, rest = call_args(cfg)
    return json.dumps({"task": task, **{k: v for k, v in rest.items() if k not in NOT_BEFORE + tuple(TRAINER_OPTIONS)}},
                      sort_keys=True)


def validate(config: dict, known_tasks: Iterable[str] | None = None) -> list[dict]:
    """Expand and check every trial; raise GridError listing the problems before any trial runs.

    ``known_tasks`` defaults to the trial function's module's ``task_names()`` if it has one,
    else lorazoo's registered tasks. Returns the trial configs.
    """
    study = normalize_study(config)
    fn = load_trial_fn(study["trial_fn"])
    if known_tasks is None:
        known_tasks = _known_tasks(fn)
    known_tasks = set(known_tasks)
    trials = expand(study)
    problems: dict[str, list[str]] = {}  # message -> the trials it concerns

    def problem(msg: str, where: str | None = None) -> None:
        problems.setdefault(msg, [])
        if where:
            problems[msg].append(where)

    from ..errors import LorazooError
    from ..variants import variants

    known_variants = set(variants())
    for cfg in trials:
        where = _describe(cfg)
        for key in ("task", "variant", "lr"):
            if key not in cfg:
                problem(f"no {key!r} (put it in the sweep's grid or fixed values)", where)
        if {"task", "variant", "lr"} - set(cfg):
            continue
        if cfg["task"] not in known_tasks:
            problem(f"unknown task {cfg['task']!r}; known tasks: {', '.join(sorted(known_tasks)) or 'none'}")
        if cfg["variant"] not in known_variants:
            problem(f"unknown variant {cfg['variant']!r}; known variants: {', '.join(sorted(known_variants))}")
            continue
        for msg in _check_numbers(cfg):
            problem(msg, where)
        try:
            task, _, kwargs = call_args(cfg)
        except LorazooError as e:
            problem(str(e), where)
            continue
        if study["trial_fn"] == DEFAULT_TRIAL_FN and task in known_tasks:
            msg = _check_task_options(task, kwargs)
            if msg:
                problem(msg, where)
    if problems:
        lines = []
        for msg, wheres in list(problems.items())[:MAX_PROBLEMS]:
            if wheres:
                msg += f" [{wheres[0]}" + (f" and {len(wheres) - 1} more" if len(wheres) > 1 else "") + "]"
            lines.append(msg)
        if len(problems) > MAX_PROBLEMS:
            lines.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        raise GridError(f"study {study['name']!r} has an invalid grid (no trial was run):\n  "
                        + "\n  ".join(lines))
    return trials


def _check_numbers(cfg: dict) -> list[str]:
    out = []

    def num(key, *, integer=False, positive=True, optional=False):
        v = cfg.get(key)
        if key not in cfg or (optional and v is None):
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and integer:
            ok = float(v).is_integer()
        if not ok:
            out.append(f"{key} must be {'an integer' if integer else 'a finite number'}, got {v!r}")
        elif positive and v <= 0:
            out.append(f"{key} must be > 0, got {v!r}")
        elif not positive and v < 0:
            out.append(f"{key} must be >= 0, got {v!r}")

    num("lr")
    num("epochs")
    num("batch_size", integer=True)
    num("limit", integer=True, optional=True)
    num("seed", integer=True, positive=False)
    return out


def _check_task_options(task: str, kwargs: dict) -> str | None:
    """For lorazoo's own run(): options must be the task's or the trainer's."""
    from ..tasks.base import task_class, task_names

    if task not in task_names():  # known only to the caller's list: nothing to check against
        return None
    try:
        from ..run import TRAINER_OPTIONS
    except ImportError:  # pragma: no cover - run.py not there yet
        TRAINER_OPTIONS = {}
    accepted = set(task_class(task).options) | set(TRAINER_OPTIONS) | set(RUN_KEYS) | {"lr"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        return (f"unknown option(s) {', '.join(unknown)} for task {task!r}: not a spec field, a part "
                f"option of the variant, a trainer option or a task option "
                f"(task options: {', '.join(sorted(task_class(task).options)) or 'none'})")
    return None


def _known_tasks(fn: Callable) -> list[str]:
    mod = importlib.import_module(fn.__module__)
    if callable(getattr(mod, "task_names", None)) and fn.__module__ != "lorazoo.run":
        return list(mod.task_names())
    from ..tasks.base import task_names

    return task_names()


def _describe(cfg: dict) -> str:
    return "trial " + " ".join(f"{k}={cfg[k]}" for k in AXIS_ORDER if k in cfg)


def label(cfg: dict) -> str:
    """A short human label of a trial config."""
    return " ".join(f"{k}={cfg[k]}" for k in AXIS_ORDER if k in cfg) or trial_id(cfg)
