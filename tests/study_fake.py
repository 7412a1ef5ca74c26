"""A fake trial function for the study tests: no model, a short sleep, a synthetic result.

The study runner imports it in each trial process as ``study_fake:trial`` (tests put this folder
on PYTHONPATH). With ``STUDY_FAKE_LOG`` set, each completed call appends its config to that file,
so tests can count how often a trial really ran.
"""
import json
import math
import os
import time
import uuid


def task_names():
    """The tasks this fake knows (the grid validation asks the trial function's module)."""
    return ["toy", "toy2"]


def trial(task, spec, *, lr, epochs=1, batch_size=16, limit=None, seed=0, progress=True, sleep=0.05,
          fail=False, **options):
    time.sleep(sleep)
    if fail:
        raise RuntimeError(f"fake failure for {task} lr={lr}")
    # accuracy peaks at lr=1e-3, a little higher for higher ranks
    score = 0.9 - 0.05 * (math.log10(lr) + 3) ** 2 + 0.001 * spec.rank + 0.01 * seed
    steps = 20
    losses = [0.7 * math.exp(-lr * 300 * i) + 0.1 for i in range(steps)]
    result = {
        "task": task, "spec": spec.to_dict(), "lr": lr, "metric_name": "accuracy", "metric_before": 0.5,
        "metric": score, "metrics_per_epoch": [{"epoch": 1, "accuracy": score, "loss": losses[-1]}],
        "losses": losses, "steps": steps, "train_seconds": sleep, "trainable_params": 100 * spec.rank,
        "peak_rss_mb": 1.0, "nonce": uuid.uuid4().hex, "options": options,
    }
    path = os.environ.get("STUDY_FAKE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"task": task, "lr": lr, "seed": seed}) + "\n")
    return result


def tiny_run(task, spec, *, out_dir=None, checkpoint_every=None, resume=False, metrics_before=None, **kwargs):
    """lorazoo's ``run`` on the tiny task, which this process registers. With ``STUDY_KILL_AT=N`` the
    process kills itself (SIGKILL) right after its first checkpoint at step >= N, once: a marker file
    next to the log remembers it. Each call appends to ``STUDY_FAKE_LOG`` the checkpoint it started
    from (None: from scratch)."""
    import signal

    from lorazoo import train
    from lorazoo.checkpoint import latest_checkpoint
    from lorazoo.run import CHECKPOINTS, run
    from lorazoo.tasks.base import TASKS
    from tiny import TinyTask

    TASKS[TinyTask.name] = TinyTask
    kill_at, log = os.environ.get("STUDY_KILL_AT"), os.environ.get("STUDY_FAKE_LOG")
    marker = f"{log}.killed"
    if kill_at and not os.path.exists(marker):
        save = train.Trainer._save_checkpoint

        def save_then_die(self, *a, **kw):
            folder = save(self, *a, **kw)
            if self.step >= int(kill_at):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return folder

        train.Trainer._save_checkpoint = save_then_die
    start = latest_checkpoint(os.path.join(out_dir, CHECKPOINTS)) if out_dir else None
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"out_dir": out_dir, "from": start and start.name, "variant": spec.form,
                                "given_before": metrics_before is not None}) + "\n")
    return run(task, spec, out_dir=out_dir, checkpoint_every=checkpoint_every, resume=resume,
               metrics_before=metrics_before, **kwargs)
