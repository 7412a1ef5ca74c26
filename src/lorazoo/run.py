"""run(): one adapter spec trained and evaluated on one task. The unit other code builds on
(the CLI's ``train``, the study runner's trials)."""
from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import torch

from .adapt import adapt
from .errors import LorazooError
from .files import _atomic
from .parts import check_number
from .spec import AdapterSpec
from .tasks.base import get_task
from .train import Trainer, check_trainer_options
from .version import __version__

TASK_FILE = "task.json"
RESULT_FILE = "result.json"
# keywords of run() that configure the trainer rather than the task, with their defaults
TRAINER_OPTIONS = {"lr_schedule": "linear", "warmup": 0.1, "accumulation": 1, "weight_decay": 0.0,
                   "max_grad_norm": 1.0}


def run(task: str, spec: AdapterSpec, *, lr: float, epochs: float = 1, batch_size: int = 16,
        limit: int | None = None, seed: int = 0, out_dir: str | None = None, progress: bool = True,
        **task_options) -> dict:
    """Build the task's model, adapt it with ``spec``, train, evaluate before and after.

    ``task_options`` go to the task (``max_length=64``, ``test_size=1000``...), except the
    trainer's own keywords: ``lr_schedule`` ("linear", "cosine", "constant"), ``warmup``
    (fraction of steps, or steps if >= 1), ``accumulation``, ``weight_decay``, ``max_grad_norm``
    (None turns clipping off). The task's ``modules_to_save`` (its fresh head) are added to the
    spec. Calibration batches from the training split are passed when the init needs them.

    With ``out_dir`` the adapter is saved there, with ``task.json`` (what ``lorazoo eval`` needs to
    rebuild the task) and ``result.json`` (this function's return value).
    Returns a JSON-serializable dict (see the keys below).
    """
    if not isinstance(spec, AdapterSpec):
        raise LorazooError(f"spec must be a lorazoo.AdapterSpec, got {type(spec).__name__}")
    check_number("batch_size", batch_size, minimum=1, integer=True)
    trainer_opts = {k: task_options.pop(k, v) for k, v in TRAINER_OPTIONS.items()}
    t = get_task(task, limit=limit, seed=seed, options=task_options)
    spec = with_task_defaults(spec, t)
    check_trainer_options(lr=lr, epochs=epochs, **trainer_opts)  # before minutes of loading

    torch.manual_seed(seed)  # the fresh head's init
    model = t.build_model()
    calibration = None
    if spec.part_classes()["init"].needs_calibration:
        calibration = t.calibration_batches(batch_size=batch_size)
    handle = adapt(model, spec, calibration=calibration)
    before = t.evaluate(model)

    torch.manual_seed(seed)  # dropout and rank-dropout masks
    trainer = Trainer(model, handle, lr=lr, epochs=epochs, progress=progress, evaluate=t.evaluate,
                      **trainer_opts)
    hist = trainer.fit(lambda epoch: t.train_batches(int(batch_size), epoch))
    after = hist["metrics_per_epoch"][-1] if hist["metrics_per_epoch"] else t.evaluate(model)

    result = {
        "task": t.name,
        "task_config": t.config(),
        "spec": spec.to_dict(),
        "lr": float(lr),
        "epochs": float(epochs),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "trainer": trainer_opts,
        "metric_name": t.metric,
        "metric_before": float(before[t.metric]),
        "metric": float(after[t.metric]),
        "metrics_before": before,
        "metrics_per_epoch": hist["metrics_per_epoch"],
        "losses": hist["losses"],
        "steps": hist["steps"],
        "train_seconds": round(hist["train_seconds"], 3),
        "trainable_params": handle.num_trainable(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
        "lorazoo_version": __version__,
        "python": platform.python_version(),
    }
    if out_dir is not None:
        save_run(handle, t.config(), result, out_dir)
    return result


def with_task_defaults(spec: AdapterSpec, task) -> AdapterSpec:
    """``spec`` with the task's ``modules_to_save`` added (its fresh head must train and be saved)."""
    missing = [m for m in task.modules_to_save if m not in spec.modules_to_save]
    if not missing:
        return spec
    return AdapterSpec.from_dict({**spec.to_dict(), "modules_to_save": [*spec.modules_to_save, *missing]})


def save_run(handle, task_config: dict, result: dict, out_dir) -> None:
    """Save the adapter, ``task.json`` and ``result.json`` into ``out_dir``."""
    out = Path(out_dir)
    handle.save(out)
    _atomic(out / TASK_FILE, lambda f: Path(f).write_text(json.dumps(task_config, indent=1)))
    _atomic(out / RESULT_FILE, lambda f: Path(f).write_text(json.dumps(result, indent=1)))


def read_task_config(path) -> dict:
    """The task.json beside a saved adapter, checked."""
    f = Path(path) / TASK_FILE
    if not f.is_file():
        raise LorazooError(f"{str(path)!r} holds no {TASK_FILE}; it was not written by `lorazoo train` "
                           f"or lorazoo.run.run(out_dir=...)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LorazooError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        raise LorazooError(f"{f} does not name a task")
    return cfg


def evaluate_saved(path, **option_overrides) -> dict:
    """Rebuild the task stored beside the adapter in ``path``, load the adapter, evaluate it."""
    from .io import load

    cfg = read_task_config(path)
    t = get_task(cfg["task"], limit=cfg.get("limit"), seed=cfg.get("seed", 0),
                 options={**cfg.get("options", {}), **option_overrides})
    model = t.build_model()
    load(model, path)
    metrics = t.evaluate(model)
    return {"task": t.name, "metric_name": t.metric, "metric": float(metrics[t.metric]), "metrics": metrics}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
