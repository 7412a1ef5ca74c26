"""lorazoo eval: evaluate a saved adapter folder on the task stored beside it (task.json)."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a saved adapter folder on its task",
                       description="Load the adapter in FOLDER onto a fresh base model of the task named "
                                   "in FOLDER/task.json and print the task's metrics on its test split.")
    p.add_argument("folder", help="a folder written by `lorazoo train` (adapter + task.json)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stored task option, e.g. eval_batch_size=64 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..run import evaluate_saved
    from .train import parse_options

    result = evaluate_saved(args.folder, **parse_options(args.task_option, "--task-option"))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result["metrics"].items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0
