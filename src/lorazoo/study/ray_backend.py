"""Ray backend: the same trials (each in a fresh ``python -m lorazoo.study.trial`` process) run
as Ray tasks on a cluster; the driver alone writes the study file. Ray is an optional extra
(``pip install lorazoo[ray]``) imported only here, only when used.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable

from .errors import StudyError
from .process import collect, spawn


def import_ray():
    """The ``ray`` module, or StudyError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise StudyError("the Ray backend needs Ray: pip install 'lorazoo[ray]' (or pip install ray); "
                         "or use the local backend (--backend local --workers N)") from None
    return ray


def run_trial_process(tid: str, config: dict, trial_fn: str, threads: int | None,
                      timeout: float | None, resume: dict | None = None) -> dict:
    """Run one trial in a fresh process on this node and return its outcome (the Ray task body)."""

    workdir = tempfile.mkdtemp(prefix="lorazoo-trial-")
    try:
        tp = spawn(tid, config, trial_fn, workdir, threads, resume)
        try:
            tp.proc.wait(timeout=timeout)
            late = None
        except subprocess.TimeoutExpired:
            tp.proc.kill()
            tp.proc.wait()
            late = timeout
        out = collect(tp, late)
        out["worker"] = f"ray:{os.uname().nodename}"
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class RayBackend:
    """Submit trials as Ray tasks, at most as many at once as the cluster has CPUs for."""

    def __init__(self, address: str | None = None, cpus_per_trial: float = 1, threads: int | None = None,
                 timeout: float | None = None):
        if not cpus_per_trial or cpus_per_trial <= 0:
            raise StudyError(f"cpus_per_trial must be > 0, got {cpus_per_trial!r}")
        self.ray = import_ray()
        self.address, self.cpus, self.timeout = address, cpus_per_trial, timeout
        self.threads = threads or max(1, int(cpus_per_trial))

    def run(self, todo: list[dict], trial_fn: str, on_start: Callable, on_finish: Callable,
            tick: Callable) -> None:
        ray = self.ray
        started_here, refs = not ray.is_initialized(), {}
        if started_here:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        try:
            task = ray.remote(num_cpus=self.cpus, max_retries=0)(run_trial_process)
            slots = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus))
            queue = list(todo)
            while queue or refs:
                while queue and len(refs) < slots:
                    t = queue.pop(0)
                    on_start(t["id"], "ray")
                    refs[task.remote(t["id"], t["config"], trial_fn, self.threads, self.timeout, t.get("resume"))] = (
                        t["id"], time.time())
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in ready:
                    tid, t0 = refs.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a lost worker or node
                        outcome = {"status": "failed", "result": None, "error": f"Ray task failed: {e}",
                                   "wall_seconds": round(time.time() - t0, 3)}
                    on_finish(tid, outcome)
                tick()
        finally:
            for ref in refs:  # interrupted: stop what still runs
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
