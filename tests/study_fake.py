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
