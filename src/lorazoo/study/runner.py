"""The study runner: validate the grid, store its trials, run the unfinished ones, each in its
own fresh process (``python -m lorazoo.study.trial``), locally or on Ray.

Only the runner writes to the study file. A trial is marked ``running`` when its process starts
and ``done``/``failed`` in one transaction when the process returns; a rerun puts trials left
``running`` by a killed runner back to ``pending`` and skips ``done`` ones.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import StudyError
from .grid import label, normalize_study, trial_id, validate
from .store import Store
from .trial import PARENT_ENV

HEARTBEAT_EVERY_S = 10.0
LOG_TAIL = 4000


@dataclass
class TrialProcess:
    """A trial running in a child process, with its input, output and log files."""

    tid: str
    config: dict
    proc: subprocess.Popen
    out_path: str
    log_path: str
    started: float = field(default_factory=time.time)


def child_env(threads: int | None) -> dict:
    """The environment of a trial process: this one's, with thread counts and the parent pid."""
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def spawn(tid: str, config: dict, trial_fn: str, workdir: str, threads: int | None) -> TrialProcess:
    """Start ``python -m lorazoo.study.trial`` for one trial."""
    in_path, out_path, log_path = (os.path.join(workdir, f"{tid}.{ext}") for ext in ("in.json", "out.json", "log"))
    with open(in_path, "w") as f:
        json.dump({"trial_fn": trial_fn, "config": config, "threads": threads}, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorazoo.study.trial", in_path, out_path],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(threads), start_new_session=True)
    return TrialProcess(tid, config, proc, out_path, log_path)


def collect(tp: TrialProcess, timed_out: float | None = None) -> dict:
    """The outcome of a finished trial process (a crash or a timeout becomes a failed outcome)."""
    wall = round(time.time() - tp.started, 3)
    try:
        with open(tp.out_path) as f:
            out = json.load(f)
    except (OSError, json.JSONDecodeError):
        out = None
    if out is None or timed_out is not None:
        why = (f"timed out after {timed_out:g} s" if timed_out is not None
               else f"trial process exited with status {tp.proc.returncode} without a result")
        out = {"status": "failed", "result": None, "error": f"{why}; log tail:\n{_tail(tp.log_path)}"}
    out["wall_seconds"] = wall
    return out


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-LOG_TAIL:]
    except OSError:
        return ""


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
                    running[t["id"]] = spawn(t["id"], t["config"], trial_fn, workdir, self.threads)
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
              cpus_per_trial: float = 1, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run a study's unfinished trials and record them in ``db``; returns the status counts.

    The grid is validated first (GridError, nothing stored or run). ``retry_failed=False`` leaves
    failed trials alone. ``backend`` is "local" (``workers`` processes) or "ray" (``ray_address``;
    a local Ray instance when None).
    """
    study = normalize_study(config)
    trials = validate(study, known_tasks)
    if backend not in ("local", "ray"):
        raise StudyError(f"unknown backend {backend!r}; backends: local, ray")
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
            todo = [t for t in rows if t["id"] in wanted and t["status"] not in skip]
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


def _run(store: Store, name: str, runner, todo: list[dict], trial_fn: str, log) -> None:
    total, n_done, last_beat = len(todo), [0], [time.time()]
    started: set[str] = set()
    configs = {t["id"]: t["config"] for t in todo}

    def on_start(tid: str, worker: str) -> None:
        store.mark_running(name, tid, worker)
        started.add(tid)

    def on_finish(tid: str, outcome: dict) -> None:
        store.finish(name, tid, outcome)
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
