"""The study runner: validate the grid, store its trials, run the unfinished ones, each in its
own fresh process (``python -m lorazoo.study.trial``), locally or on Ray.

Only the runner writes to the study file. A trial is marked ``running`` when its process starts
and ``done``/``failed`` in one transaction when the process returns; a rerun puts trials left
``running`` by a killed runner back to ``pending`` and skips ``done`` ones.

Each trial checkpoints into its own folder, ``<db>.trials/<trial id>`` (every ``checkpoint_every``
steps, when its trial function can: see ``trial.resume_options``), so a trial killed mid-way resumes
from its last checkpoint on the next run instead of starting over. The folder is removed once the
trial is done; a failed trial keeps it, so its retry resumes too. With the Ray backend the folder
must be on storage the workers share, else each retry starts over. A trial whose config says
``keep_adapter: true`` (a study option, see ``grid.STUDY_OPTIONS``) saves its adapter into that
folder, which is then moved, without its checkpoints, to ``<db>.adapters/<trial id>`` (its path is
recorded as ``adapter_dir`` in the trial's result) for analyses of the adapters.

The base model's "before" metrics are measured once per ``grid.before_key`` (task, seed, task
options): a trial that starts after another with the same key has finished gets them in its payload,
and ``run`` uses them instead of evaluating again when its adapter starts as the base model (a
sixth of a trial on the paper suite).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

from .errors import StudyError
from .grid import before_key, label, normalize_study, trial_id, validate
from .process import collect, spawn
from .store import Store, adapter_dir

HEARTBEAT_EVERY_S = 10.0
CHECKPOINT_EVERY = 50  # steps between a trial's checkpoints (small adapters: a few ms each)


def trial_dir(db: str | os.PathLike, tid: str) -> Path:
    """The folder trial ``tid`` of the study file ``db`` checkpoints into."""
    return Path(f"{os.fspath(db)}.trials") / tid


def keep_folder(folder: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Move a finished trial's ``folder`` (its saved adapter) to ``dest``, without its checkpoints."""
    from ..run import CHECKPOINTS

    shutil.rmtree(Path(folder) / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)  # a rerun of the same trial replaces the old copy
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(folder), os.fspath(dest))
    return os.fspath(dest)


def default_threads(workers: int) -> int:
    """Torch threads per trial so that ``workers`` trials share this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


class LocalBackend:
    """Up to ``workers`` trial processes at once on this machine, scheduled from the main thread
    (so that each child's parent-death signal stays tied to the runner)."""

    def __init__(self, workers: int = 1, threads: int | None = None, timeout: float | None = None):
        if not isinstance(workers, int) or workers < 1:
            raise StudyError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers, self.timeout = workers, timeout
        self.threads = threads or default_threads(workers)

    def run(self, todo: list[dict], trial_fn: str, on_start: Callable, on_finish: Callable,
            tick: Callable) -> None:
        queue, running = deque(todo), {}
        workdir = tempfile.mkdtemp(prefix="lorazoo-study-")
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    t = queue.popleft()
                    on_start(t["id"], f"local:{os.getpid()}")
                    running[t["id"]] = spawn(t["id"], t["config"], trial_fn, workdir, self.threads,
                                               t.get("resume"))
                for tid, tp in list(running.items()):
                    late = self.timeout is not None and time.time() - tp.started > self.timeout
                    if tp.proc.poll() is None and not late:
                        continue
                    if late and tp.proc.poll() is None:
                        tp.proc.kill()
                        tp.proc.wait()
                    del running[tid]
                    on_finish(tid, collect(tp, self.timeout if late else None))
                tick()
                time.sleep(0.05)
        finally:
            for tp in running.values():
                tp.proc.kill()
                tp.proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)


def run_study(db: str | os.PathLike, config: dict, *, workers: int = 1, backend: str = "local",
              threads: int | None = None, timeout: float | None = None, retry_failed: bool = True,
              known_tasks: Iterable[str] | None = None, ray_address: str | None = None,
              cpus_per_trial: float = 1, force: bool = False, checkpoint_every: int | None = CHECKPOINT_EVERY,
              log: Callable[[str], None] = print) -> dict:
    """Run a study's unfinished trials and record them in ``db``; returns the status counts.

    The grid is validated first (GridError, nothing stored or run). ``retry_failed=False`` leaves
    failed trials alone. ``backend`` is "local" (``workers`` processes) or "ray" (``ray_address``;
    a local Ray instance when None). ``checkpoint_every`` (steps; None or 0: off) sets how often each
    trial checkpoints into ``<db>.trials/<trial id>`` to resume from if killed.
    """
    study = normalize_study(config)
    trials = validate(study, known_tasks)
    if backend not in ("local", "ray"):
        raise StudyError(f"unknown backend {backend!r}; backends: local, ray")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 0):
        raise StudyError(f"checkpoint_every must be a whole number of steps >= 0, got {checkpoint_every!r}")
    if timeout is not None and timeout <= 0:
        raise StudyError(f"timeout must be > 0 seconds, got {timeout!r}")
    if backend == "ray":
        from .ray_backend import RayBackend

        runner = RayBackend(address=ray_address, cpus_per_trial=cpus_per_trial, threads=threads,
                            timeout=timeout)
    else:
        runner = LocalBackend(workers, threads, timeout)
    name = study["name"]
    with Store(db) as store:
        store.save_study(name, study)
        store.claim(name, force=force)
        try:
            new = store.add_trials(name, trials)
            requeued = store.requeue_running(name)
            wanted = {trial_id(c) for c in trials}
            skip = {"done"} if retry_failed else {"done", "failed"}
            rows = store.trials(name)
            order = {trial_id(c): i for i, c in enumerate(trials)}  # the grid's order, also for added sweeps
            todo = sorted((t for t in rows if t["id"] in wanted and t["status"] not in skip), key=lambda t: order[t["id"]])
            for t in todo:
                keep = bool(t["config"].get("keep_adapter"))
                if checkpoint_every or keep:
                    t["resume"] = {"trial_dir": str(trial_dir(db, t["id"])), "checkpoint_every": checkpoint_every or None}
                if keep:
                    t["resume"].update(keep_adapter=True, adapter_dir=str(adapter_dir(db, t["id"])))
            extra = len(rows) - len(wanted)
            log(f"study {name!r} in {db}: {len(trials)} trials ({new} new), {len(trials) - len(todo)} "
                f"finished, {len(todo)} to run" + (f" ({requeued} interrupted)" if requeued else "")
                + (f"; {extra} stored trials not in this grid are kept" if extra > 0 else ""))
            _run(store, name, runner, todo, study["trial_fn"], log)
            counts = store.counts(name)
        finally:
            store.release(name)
    log("done: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return counts


def _base_metrics(rows: list[dict]) -> dict[str, dict]:
    """{before_key: the base model's metrics} from done trials that measured them (``before_is_base``)."""
    out = {}
    for t in rows:
        res = t.get("result") or {}
        if t["status"] == "done" and res.get("before_is_base") and res.get("metrics_before") is not None:
            out.setdefault(before_key(t["config"]), res["metrics_before"])
    return out


def _run(store: Store, name: str, runner, todo: list[dict], trial_fn: str, log) -> None:
    total, n_done, last_beat = len(todo), [0], [time.time()]
    started: set[str] = set()
    configs = {t["id"]: t["config"] for t in todo}
    by_id = {t["id"]: t for t in todo}
    base = _base_metrics(store.trials(name))  # grows as trials finish

    def on_start(tid: str, worker: str) -> None:
        """Mark the trial running; hand it the base model's metrics if a trial has measured them (the
        backends read ``t["resume"]`` into the payload after this)."""
        store.mark_running(name, tid, worker)
        started.add(tid)
        known = base.get(before_key(configs[tid]))
        if known is not None:
            by_id[tid]["resume"] = {**(by_id[tid].get("resume") or {}), "metrics_before": known}

    folders = {t["id"]: t["resume"]["trial_dir"] for t in todo if t.get("resume")}
    keep = {t["id"]: t["resume"]["adapter_dir"] for t in todo if (t.get("resume") or {}).get("keep_adapter")}

    def on_finish(tid: str, outcome: dict) -> None:
        res = outcome.get("result") if isinstance(outcome.get("result"), dict) else {}
        if outcome.get("status") == "done" and res.get("before_is_base") and res.get("metrics_before") is not None:
            base.setdefault(before_key(configs[tid]), res["metrics_before"])
        if outcome.get("status") == "done" and tid in keep and isinstance(outcome.get("result"), dict):
            if Path(folders[tid]).is_dir():
                outcome["result"]["adapter_dir"] = keep_folder(folders[tid], keep[tid])
        store.finish(name, tid, outcome)
        if outcome.get("status") == "done" and tid in folders and tid not in keep:
            shutil.rmtree(folders[tid], ignore_errors=True)
        started.discard(tid)
        n_done[0] += 1
        res = outcome.get("result") or {}
        what = (f"{res.get('metric_name', 'metric')}={res['metric']:.4g}" if "metric" in res
                else (outcome.get("error") or "").strip().splitlines()[-1:] or ["failed"])
        what = what if isinstance(what, str) else "FAILED: " + what[0]
        log(f"[{n_done[0]}/{total}] {outcome['status']:6s} {label(configs[tid])} {what} "
            f"({outcome.get('wall_seconds', 0):.1f} s)")

    def tick() -> None:
        if time.time() - last_beat[0] > HEARTBEAT_EVERY_S:
            store.heartbeat(name)
            last_beat[0] = time.time()

    try:
        runner.run(todo, trial_fn, on_start, on_finish, tick)
    finally:
        if started:  # interrupted (Ctrl-C, error): what ran is unfinished, not failed
            store.requeue_running(name, started)
