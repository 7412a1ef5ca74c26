"""One trial in its own fresh process (``python -m lorazoo.study.trial``): start it, read its outcome.
Both backends (local, Ray) run trials through these."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .trial import PARENT_ENV

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


def spawn(tid: str, config: dict, trial_fn: str, workdir: str, threads: int | None,
          resume: dict | None = None) -> TrialProcess:
    """Start ``python -m lorazoo.study.trial`` for one trial; ``resume`` holds its ``trial_dir`` and
    ``checkpoint_every`` when the trial should checkpoint and resume (see ``trial.resume_options``)."""
    in_path, out_path, log_path = (os.path.join(workdir, f"{tid}.{ext}") for ext in ("in.json", "out.json", "log"))
    with open(in_path, "w") as f:
        json.dump({"trial_fn": trial_fn, "config": config, "threads": threads, **(resume or {})}, f)
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
