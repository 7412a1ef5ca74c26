"""run(): one adapter spec trained and evaluated on one task. The unit other code builds on
(the CLI's ``train``, the study runner's trials)."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch

from .adapt import adapt
from .checkpoint import latest_checkpoint, read_checkpoint
from .distributed import barrier, initialized, is_main_process
from .errors import LorazooError
from .files import _atomic
from .parts import check_number
from .spec import AdapterSpec
from .tasks.base import TASKS, get_task
from .train import Trainer, check_trainer_options
from .version import __version__

TASK_FILE = "task.json"
RESULT_FILE = "result.json"
RUN_FILE = "run.json"            # run()'s arguments, written when checkpoints are on (for --resume)
CHECKPOINTS = "checkpoints"      # the training checkpoints' folder inside out_dir
# keywords of run() that configure the trainer rather than the task, with their defaults
TRAINER_OPTIONS = {"lr_schedule": "linear", "warmup": 0.1, "accumulation": 1, "weight_decay": 0.0,
                   "max_grad_norm": 1.0}


def run(task: str, spec: AdapterSpec, *, lr: float, epochs: float = 1, batch_size: int = 16,
        limit: int | None = None, seed: int = 0, out_dir: str | None = None, progress: bool = True,
        checkpoint_every: int | None = None, resume: bool = False, quantize: str | None = None,
        metrics_before: dict | None = None, **task_options) -> dict:
    """Build the task's model, adapt it with ``spec``, train, evaluate before and after.

    ``task_options`` go to the task (``max_length=64``, ``test_size=1000``...), except the
    trainer's own keywords: ``lr_schedule`` ("linear", "cosine", "constant"), ``warmup``
    (fraction of steps, or steps if >= 1), ``accumulation``, ``weight_decay``, ``max_grad_norm``
    (None turns clipping off). The task's ``modules_to_save`` (its fresh head) are added to the
    spec. Calibration batches from the training split are passed when the init needs them.

    With ``out_dir`` the adapter is saved there, with ``task.json`` (what ``lorazoo eval`` needs to
    rebuild the task) and ``result.json`` (this function's return value).
    ``checkpoint_every`` (steps, needs ``out_dir``) writes training checkpoints into
    ``out_dir/checkpoints`` (see :mod:`lorazoo.checkpoint`) and this call's arguments into
    ``out_dir/run.json``; ``resume=True`` with the same arguments continues a killed run from its
    newest checkpoint (from the start if it has none) and ends as the uninterrupted run would; a
    finished run's ``result.json`` is returned as it is.
    ``quantize`` ("nf4", "fp4", "int8", "torchao-nf4"; see :mod:`lorazoo.quantize`) quantizes the task's
    model before adapting it (QLoRA).
    ``metrics_before``: the base model's metrics on this task's test split, measured by an earlier
    run with the same task, seed and task options (a study passes them on, see
    ``study.grid.before_key``); used instead of the "before" evaluation when the spec's init starts
    as the base model (within rounding), so the same base is not evaluated once per variant.
    Returns a JSON-serializable dict (see the keys below); ``before_is_base`` says whether its
    ``metrics_before`` are the base model's.
    """
    if not isinstance(spec, AdapterSpec):
        raise LorazooError(f"spec must be a lorazoo.AdapterSpec, got {type(spec).__name__}")
    check_number("batch_size", batch_size, minimum=1, integer=True)
    if (checkpoint_every is not None or resume) and out_dir is None:
        raise LorazooError("checkpoint_every and resume need out_dir, the folder the run is saved in")
    arguments = {"task": task, "spec": spec.to_dict(), "lr": lr, "epochs": epochs, "batch_size": batch_size,
                 "limit": limit, "seed": seed, "checkpoint_every": checkpoint_every, **task_options}
    if quantize is not None:  # only when set, so earlier runs' run.json still match on resume
        from .quantize import parse_choice

        parse_choice(quantize)
        arguments["quantize"] = quantize
    trainer_opts = {k: task_options.pop(k, v) for k, v in TRAINER_OPTIONS.items()}
    t = get_task(task, limit=limit, seed=seed, options=task_options)
    spec = with_task_defaults(spec, t)
    check_trainer_options(lr=lr, epochs=epochs, checkpoint_every=checkpoint_every, **trainer_opts)
    checkpoints = None if out_dir is None else Path(out_dir) / CHECKPOINTS
    latest = None
    if resume:
        stored = read_run_arguments(out_dir)
        if stored is not None and _canonical(stored) != _canonical(arguments):
            diff = sorted(k for k in {*stored, *arguments} if _canonical(stored.get(k)) != _canonical(arguments.get(k)))
            raise LorazooError(f"{out_dir} holds a run started with other arguments ({', '.join(diff)} differ); "
                               f"resume it with the arguments in its {RUN_FILE}, or use another out_dir")
        if (Path(out_dir) / RESULT_FILE).is_file() and stored is not None:
            return json.loads((Path(out_dir) / RESULT_FILE).read_text())  # it finished
        latest = latest_checkpoint(checkpoints)
    if checkpoint_every is not None and latest is None and is_main_process():  # rank 0 writes
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        _atomic(Path(out_dir) / RUN_FILE, lambda f: Path(f).write_text(json.dumps(arguments, indent=1)))

    model = fresh_model(t, seed)
    if quantize is not None:
        from .quantize import parse_choice, quantize as quantize_model

        quantize_model(model, *parse_choice(quantize))
    calibration = None
    if spec.part_classes()["init"].needs_calibration:
        calibration = t.calibration_batches(batch_size=batch_size)
    handle = adapt(model, spec, calibration=calibration)
    before = None
    if latest is not None:  # measured before the run was killed
        before = read_checkpoint(latest)[1].get("extra", {}).get("metrics_before")
    parts = spec.part_classes()
    starts_as_base = parts["init"].starts_as_base and parts["form"].zero_init  # (within rounding)
    if before is None and metrics_before is not None and starts_as_base:
        before = metrics_before
    if before is None:
        before = t.evaluate(model)

    torch.manual_seed(seed)  # dropout and rank-dropout masks
    trainer = Trainer(model, handle, lr=lr, epochs=epochs, progress=progress, evaluate=t.evaluate,
                      checkpoint_dir=checkpoints, checkpoint_every=checkpoint_every,
                      extra={"metrics_before": before}, **trainer_opts)
    hist = trainer.fit(lambda epoch: t.train_batches(int(batch_size), epoch), resume=latest or False)
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
        "before_is_base": bool(starts_as_base),
        "metrics_per_epoch": hist["metrics_per_epoch"],
        "losses": hist["losses"],
        "steps": hist["steps"],
        "train_seconds": round(hist["train_seconds"], 3),
        "trainable_params": handle.num_trainable(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "saved_mb": None if hist["saved_mb"] is None else round(hist["saved_mb"], 3),  # activations of a step
        "torch_threads": torch.get_num_threads(),
        "lorazoo_version": __version__,
        "python": platform.python_version(),
    }
    allocation = handle.schedule.summary(handle)  # rank allocators: the final ranks per layer
    if allocation is None:  # or what the init decided (E2LoRA's sharing intervals and their ranks)
        allocation = handle.spec.part_classes()["init"].summary(handle)
    if allocation is not None:
        result["schedule_summary"] = allocation
    if out_dir is not None:
        save_run(handle, t.config(), result, out_dir)
    return result


def read_run_arguments(out_dir) -> dict | None:
    """The arguments ``run(checkpoint_every=...)`` stored in ``out_dir/run.json``, or None."""
    f = Path(out_dir) / RUN_FILE
    if not f.is_file():
        return None
    try:
        args = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LorazooError(f"{f} is not valid JSON ({e}); the run cannot be resumed") from None
    if not isinstance(args, dict) or not isinstance(args.get("task"), str) or not isinstance(args.get("spec"), dict):
        raise LorazooError(f"{f} does not hold the arguments of a lorazoo run")
    return args


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def with_task_defaults(spec: AdapterSpec, task) -> AdapterSpec:
    """``spec`` with the task's ``modules_to_save`` added (its fresh head must train and be saved), and
    the task's own targets in place of the default ``all-linear`` (Fashion's convolutions)."""
    missing = [m for m in task.modules_to_save if m not in spec.modules_to_save]
    retarget = spec.targets == "all-linear" and task.targets != "all-linear"
    if not missing and not retarget:
        return spec
    return AdapterSpec.from_dict({**spec.to_dict(), "modules_to_save": [*spec.modules_to_save, *missing],
                                  **({"targets": task.targets} if retarget else {})})


def save_run(handle, task_config: dict, result: dict, out_dir) -> None:
    """Save the adapter, ``task.json`` and ``result.json`` into ``out_dir``."""
    out = Path(out_dir)
    handle.save(out)
    if is_main_process():  # under torch.distributed rank 0 writes the folder, the others wait for it
        _atomic(out / TASK_FILE, lambda f: Path(f).write_text(json.dumps(task_config, indent=1)))
        _atomic(out / RESULT_FILE, lambda f: Path(f).write_text(json.dumps(result, indent=1)))
    barrier()


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


def fresh_model(t, seed: int):
    """The task's model as a run with ``seed`` builds it: its fresh head (a classifier) drawn from that
    seed, so an adapter saved by that run finds the same base (its fingerprint covers saved heads)."""
    torch.manual_seed(seed)
    return t.build_model()


def load_saved(path, **option_overrides):
    """(task, model, handle): the task stored beside the adapter in ``path`` rebuilt, its model with the
    adapter loaded."""
    from .io import load

    cfg = read_task_config(path)
    t = get_task(cfg["task"], limit=cfg.get("limit"), seed=cfg.get("seed", 0),
                 options={**cfg.get("options", {}), **option_overrides})
    model = fresh_model(t, cfg.get("seed", 0))
    return t, model, load(model, path)


def evaluate_saved(path, **option_overrides) -> dict:
    """Rebuild the task stored beside the adapter in ``path``, load the adapter, evaluate it."""
    t, model, _ = load_saved(path, **option_overrides)
    metrics = t.evaluate(model)
    return {"task": t.name, "metric_name": t.metric, "metric": float(metrics[t.metric]), "metrics": metrics}


EXPORTS = ("merged", "peft")


def export_saved(path, out, format: str = "merged") -> list[str]:
    """Write the run in ``path`` for use without lorazoo into the new folder ``out``; the files written.

    ``merged``: the adapter folded into the base weights (``merge_and_unload``), saved with the model's own
    ``save_pretrained`` (a Hugging Face model folder, safetensors) and the task's tokenizer beside it; a model
    without ``save_pretrained`` is written as ``model.safetensors`` (its state_dict). ``peft``: PEFT's adapter
    files, for ``PeftModel.from_pretrained`` on the task's base model (methods PEFT has). Refused, before
    anything is written, when ``out`` exists and is not empty, the format is unknown, or the adapter cannot
    be merged (or PEFT has no such method)."""
    out = Path(out)
    if format not in EXPORTS:
        raise LorazooError(f"format must be one of {', '.join(EXPORTS)}, got {format!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorazooError(f"{str(out)!r} exists and is not an empty folder; export writes a new folder (remove it "
                           f"or choose another)")
    t, model, handle = load_saved(path)
    if format == "peft":
        handle.save(out, format="peft")
    else:
        model = handle.merge_and_unload()
        out.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out)
            processor = t.processor()
            if processor is not None:
                processor.save_pretrained(out)
        else:
            from safetensors.torch import save_model

            save_model(model, str(out / "model.safetensors"))
    return sorted(p.name for p in out.iterdir())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def spawn_run(nproc: int, *args, **kwargs) -> dict:
    """:func:`lorazoo.run.run` in ``nproc`` local processes (torch.distributed, gloo, CPU); rank 0's
    result. Tasks registered in this process are registered in the workers too (their classes
    must be importable by name, as pickling needs)."""
    check_number("nproc", nproc, minimum=1, integer=True)
    if int(nproc) == 1:
        return run(*args, **kwargs)
    if initialized():
        raise LorazooError("--nproc starts its own processes; it cannot run inside a torch.distributed group")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="lorazoo-nproc-") as d:
        result_file = os.path.join(d, "result.json")
        threads = max(1, torch.get_num_threads() // int(nproc))
        try:
            mp.start_processes(_worker, args=(int(nproc), os.path.join(d, "init"), result_file, dict(TASKS),
                                              threads, args, kwargs), nprocs=int(nproc), start_method="spawn",
                               join=True)
        except mp.ProcessRaisedException as e:  # a worker's LorazooError: say it as one
            raise LorazooError(f"a training process failed:\n{e}") from None
        return json.loads(Path(result_file).read_text())


def _worker(r: int, world: int, init_file: str, result_file: str, tasks: dict, threads: int, args, kwargs):
    import torch.distributed as dist

    for name, cls in tasks.items():
        TASKS.setdefault(name, cls)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=world)
    try:
        if r != 0:
            kwargs = {**kwargs, "progress": False}
        result = run(*args, **kwargs)
        if r == 0:
            Path(result_file).write_text(json.dumps(result))
        barrier()
    finally:
        dist.destroy_process_group()
