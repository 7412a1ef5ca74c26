"""One trial in a fresh process: ``python -m lorazoo.study.trial IN.json OUT.json``.

``IN.json`` holds ``{"trial_fn": "module:function", "config": {...}, "threads": n}`` and, for
resumable trials, ``"trial_dir"`` and ``"checkpoint_every"``. The trial function is called as
``fn(task, spec, **kwargs)`` (see ``grid.call_args``); where it takes ``out_dir``,
``checkpoint_every`` and ``resume`` (lorazoo's ``run`` does), it also gets ``out_dir=trial_dir``,
``checkpoint_every`` and ``resume=True``, so a trial killed mid-way (runner killed, timeout, machine
lost) continues from its last checkpoint when the study is run again. A payload's
``"metrics_before"`` (the base model's metrics from an earlier trial, see ``runner``) goes to a
trial function that names that keyword. ``OUT.json`` gets
``{"status": "done"|"failed", "result", "error", "wall_seconds", "peak_rss_mb", "host", "pid"}``,
written atomically. Exit status 0 when done, 1 when the trial failed. The process dies with its
parent (the runner) on Linux, so killing the runner leaves no orphan trial behind.
"""
from __future__ import annotations

import inspect
import json
import os
import resource
import signal
import socket
import sys
import time
import traceback

PARENT_ENV = "LORAZOO_STUDY_PARENT"


def peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM on Linux, ru_maxrss elsewhere (MiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        os._exit(3)


def execute(payload: dict) -> dict:
    """Run the trial described by ``payload`` in this process; the outcome dict (never raises)."""
    t0 = time.time()
    out: dict = {"status": "failed", "result": None, "error": None, "spec": None}
    try:
        threads = payload.get("threads")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        from .grid import call_args, load_trial_fn

        fn = load_trial_fn(payload["trial_fn"])
        task, spec, kwargs = call_args(payload["config"])
        out["spec"] = spec.to_dict()
        kwargs.setdefault("progress", False)
        kwargs.update(resume_options(fn, kwargs, payload))
        if payload.get("metrics_before") is not None and "metrics_before" in inspect.signature(fn).parameters:
            kwargs["metrics_before"] = payload["metrics_before"]  # the base's, measured by an earlier trial
        result = fn(task, spec, **kwargs)
        if not isinstance(result, dict):
            raise TypeError(f"the trial function returned {type(result).__name__}, not a dict")
        json.dumps(result)  # JSON-serializable, or fail here with the reason
        out.update(status="done", result=result)
    except BaseException as e:  # noqa: BLE001 - the outcome records any failure
        out["error"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-8000:]
    out.update(wall_seconds=round(time.time() - t0, 3), peak_rss_mb=round(peak_rss_mb(), 1),
               host=socket.gethostname(), pid=os.getpid())
    return out


RESUME_ARGS = ("out_dir", "checkpoint_every", "resume")


def resume_options(fn, kwargs: dict, payload: dict) -> dict:
    """The keyword arguments that make ``fn`` checkpoint into the trial's folder and resume from it:
    none when the payload has no folder, when ``fn`` does not take all of :data:`RESUME_ARGS`, or
    when the trial's own config already sets one of them.
    A trial whose payload says ``keep_adapter`` gets ``out_dir`` (its adapter is saved there and
    kept by the runner) even with checkpoints off."""
    folder, every, keep = payload.get("trial_dir"), payload.get("checkpoint_every"), payload.get("keep_adapter")
    if not folder or not (every or keep) or any(k in kwargs for k in RESUME_ARGS):
        return {}
    params = inspect.signature(fn).parameters
    if not all(k in params for k in RESUME_ARGS):
        return {}
    if not every:
        return {"out_dir": folder}
    return {"out_dir": folder, "checkpoint_every": int(every), "resume": True}


def write_json(path: str, value: dict) -> None:
    """Write ``value`` to ``path`` atomically (temp file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lorazoo.study.trial IN.json OUT.json", file=sys.stderr)
        return 2
    _die_with_parent()
    with open(argv[0]) as f:
        payload = json.load(f)
    out = execute(payload)
    write_json(argv[1], out)
    if out["error"]:
        print(out["error"], file=sys.stderr)
    return 0 if out["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
