"""lorazoo eval: evaluate a saved adapter folder on the task stored beside it (task.json), or, for a
run on your own model and data, on a new data file (``--data FILE``)."""
from __future__ import annotations

import json

# flags that become options of the own-data task: evaluation data and its columns
DATA_FLAGS = ("text_column", "label_column", "prompt_column", "response_column")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a saved adapter folder on its task or on new data",
                       description="Load the adapter in FOLDER onto a fresh base model of the task named "
                                   "in FOLDER/task.json and print the task's metrics on its test split. For a run on "
                                   "your own model and data (lorazoo train --model DIR --data FILE), --data scores "
                                   "the adapter on a new file instead (the model, task type, columns and label "
                                   "mapping come from FOLDER).")
    p.add_argument("folder", help="a folder written by `lorazoo train` (adapter + task.json)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="own-data runs: score the adapter on this file (CSV, TSV, JSONL, Parquet or a save_to_disk "
                        "folder), all of it")
    for col in DATA_FLAGS:
        p.add_argument(f"--{col.replace('_', '-')}", default=None,
                       help=f"own-data runs: the {col.split('_')[0]} column of --data (default: the run's)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stored task option, e.g. eval_batch_size=64 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    import os

    from ..errors import LorazooError
    from ..run import evaluate_saved, read_task_config
    from .train import parse_options

    overrides = parse_options(args.task_option, "--task-option")
    columns = {c: getattr(args, c) for c in DATA_FLAGS if getattr(args, c) is not None}
    if args.data is not None or columns:
        task = read_task_config(args.folder)["task"]
        if task != "own":
            raise LorazooError(f"--data and the column flags score runs on your own data; {args.folder!r} holds "
                               f"a run on the built-in task {task!r} (evaluate it without them)")
        if args.data is None:
            raise LorazooError("the column flags describe --data; give --data FILE")
        if ("prompt_column" in columns or "response_column" in columns) and "text_column" not in columns:
            columns["text_column"] = None  # prompt + response replace a stored text column
        # no training data is read: the head's labels are stored in task.json
        overrides.update(columns, data=None, eval_data=os.path.abspath(os.path.expanduser(args.data)))
    result = evaluate_saved(args.folder, **overrides)
    if args.data is not None:
        result["data"] = overrides["eval_data"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result["metrics"].items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0
