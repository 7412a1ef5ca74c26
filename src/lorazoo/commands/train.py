"""lorazoo train: train one adapter on a task, print the metric before and after, save it.

With no arguments it runs the embedded default job: LoRA r=8 on the sentiment task, sized to take
a few minutes on 2 CPU cores. ``--checkpoint-every N`` writes a training checkpoint every N steps
into OUT/checkpoints; ``lorazoo train --resume OUT`` continues such a run, killed at any moment,
from its newest checkpoint, with the settings it was started with (OUT/run.json).
"""
from __future__ import annotations

import json
import sys

# The embedded default job (see the module docstring); every value can be overridden by a flag.
DEFAULTS = {"task": "sentiment", "variant": "lora", "rank": 8, "alpha": 16, "lr": 2e-3, "epochs": 1.0,
            "batch_size": 16, "limit": 4000, "seed": 0}
PART_FLAGS = ("form", "init", "scale", "optim", "schedule")


def register(sub) -> None:
    p = sub.add_parser("train", help="train an adapter on a task and save it",
                       description="Train one adapter (a variant preset, or its parts) on a task. "
                                   "With no arguments: LoRA r=8 on the sentiment task, a few minutes on CPU.")
    p.add_argument("--task", default=DEFAULTS["task"], help="task name (default: %(default)s)")
    p.add_argument("--variant", default=DEFAULTS["variant"],
                   help="variant preset, see `lorazoo variants` (default: %(default)s)")
    for part in PART_FLAGS:
        p.add_argument(f"--{part}", help=f"override the preset's {part} part")
    p.add_argument("--rank", type=int, default=None,
                   help="adapter rank (default: the preset's, e.g. VeRA's 256, else 8)")
    p.add_argument("--alpha", type=float, default=None, help="scale numerator (default: the preset's, else 16)")
    p.add_argument("--rank-dropout", type=float, default=None, help="DropLoRA rank dropout (default: the preset's)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module names, a regex, or all-linear (default: the task's)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: the task's run_defaults, else {DEFAULTS['lr']})")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"may be fractional (default: the task's run_defaults, else {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"(default: the task's run_defaults, else {DEFAULTS['batch_size']})")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lr-schedule", default="linear", choices=("linear", "cosine", "constant"),
                   help="decay after warmup (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="warmup: a fraction of the steps, or steps if >= 1 (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help=f"training examples (default: the task's run_defaults, else {DEFAULTS['limit']}; 0 = all)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="(default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<task>-<variant>)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a part option, e.g. loraplus_ratio=16 (repeatable)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. max_length=64 or test_size=1000 (repeatable)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a training checkpoint every N steps into OUT/checkpoints (default: none)")
    p.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run saved in OUT (started with --checkpoint-every) from its newest "
                        "checkpoint, with the settings it was started with; takes no other run flags")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the full result as JSON at the end")
    p.set_defaults(func=main, _parser=p)


def parse_options(pairs: list[str], flag: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; values are read as JSON when they parse."""
    from ..errors import LorazooError

    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise LorazooError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_spec(args):
    """The AdapterSpec the flags describe (validated: unknown variants, parts, options raise)."""
    from ..spec import AdapterSpec

    fields = {part: getattr(args, part) for part in PART_FLAGS if getattr(args, part) is not None}
    fields.update({k: getattr(args, k) for k in ("rank", "alpha") if getattr(args, k) is not None}, seed=args.seed)
    if args.rank_dropout is not None:
        fields["rank_dropout"] = args.rank_dropout
    if args.targets is not None:
        fields["targets"] = args.targets if "," not in args.targets else [
            t.strip() for t in args.targets.split(",") if t.strip()]
    fields.update(parse_options(args.option, "--option"))
    return AdapterSpec.preset(args.variant, **fields)


def run_name(args) -> str:
    parts = [f"{p}={getattr(args, p)}" for p in PART_FLAGS if getattr(args, p) is not None]
    return "-".join([args.task, args.variant, *parts])


def resolve_run_defaults(args) -> None:
    """Fill --lr, --epochs, --batch-size, --limit left unset: the task's ``run_defaults``, else DEFAULTS."""
    from ..tasks.base import task_class

    task_defaults = getattr(task_class(args.task), "run_defaults", {}) or {}
    for key in ("lr", "epochs", "batch_size", "limit"):
        if getattr(args, key) is None:
            setattr(args, key, task_defaults.get(key, DEFAULTS[key]))


# flags --resume may be given with: they do not change the run
RESUME_FLAGS = {"resume", "no_progress", "json", "func", "_parser", "command"}


def resume_main(args) -> int:
    """``lorazoo train --resume OUT``: rerun ``run`` with the arguments stored in OUT/run.json."""
    from pathlib import Path

    from ..errors import LorazooError
    from ..run import RUN_FILE, read_run_arguments, run
    from ..spec import AdapterSpec

    parser = args._parser
    given = sorted("--" + k.replace("_", "-") for k, v in vars(args).items()
                   if k not in RESUME_FLAGS and v != parser.get_default(k))
    if given:
        raise LorazooError(f"--resume takes the run's settings from {args.resume}/{RUN_FILE}; drop "
                           f"{', '.join(given)}")
    stored = read_run_arguments(args.resume)
    if stored is None:
        what = "does not exist" if not Path(args.resume).is_dir() else f"holds no {RUN_FILE}"
        raise LorazooError(f"cannot resume {args.resume!r}: it {what}; only runs started with --checkpoint-every "
                           f"can be resumed")
    kwargs = dict(stored)
    task, spec = kwargs.pop("task"), AdapterSpec.from_dict(kwargs.pop("spec"))
    print(f"lorazoo train: resuming {args.resume} ({spec.form}/{spec.init}/{spec.scale}/{spec.optim}/"
          f"{spec.schedule} r={spec.rank} on {task})", file=sys.stderr)
    result = run(task, spec, out_dir=args.resume, progress=not args.no_progress, resume=True, **kwargs)
    _report(result, args.resume, args.json)
    return 0


def _report(result: dict, out, as_json: bool) -> None:
    m = result["metric_name"]
    print(f"{m} before: {result['metric_before']:.4f}")
    print(f"{m} after:  {result['metric']:.4f}")
    print(f"trained {result['steps']} steps in {result['train_seconds']:.1f} s, "
          f"{result['trainable_params']:,} trainable parameters; adapter saved to {out}")
    if as_json:
        print(json.dumps(result, indent=1))


def main(args) -> int:
    from ..errors import LorazooError
    from ..run import TRAINER_OPTIONS, run
    from ..tasks.base import get_task
    from ..train import check_trainer_options

    if getattr(args, "resume", None) is not None:
        return resume_main(args)
    spec = build_spec(args)
    resolve_run_defaults(args)
    if args.limit is not None and args.limit < 0:
        raise LorazooError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    task_options = parse_options(args.task_option, "--task-option")
    clash = sorted(set(task_options) & set(TRAINER_OPTIONS))
    if clash:
        raise LorazooError(f"{', '.join(clash)} are trainer options: use their flags, not --task-option")
    task = get_task(args.task, limit=args.limit or None, seed=args.seed, options=task_options)  # validates
    if args.targets is None and spec.targets == "all-linear" and task.targets != "all-linear":
        spec = type(spec).from_dict({**spec.to_dict(), "targets": task.targets})
    trainer_opts = {"lr_schedule": args.lr_schedule, "warmup": args.warmup, "accumulation": args.accumulation,
                    "weight_decay": args.weight_decay}
    check_trainer_options(lr=args.lr, epochs=args.epochs, checkpoint_every=args.checkpoint_every, **trainer_opts)
    out = args.out or f"runs/{run_name(args)}"

    print(f"lorazoo train: {args.variant} ({spec.form}/{spec.init}/{spec.scale}/{spec.optim}/{spec.schedule}) "
          f"r={spec.rank} alpha={spec.alpha} on {args.task}, limit={args.limit or 'all'}, epochs={args.epochs}, "
          f"lr={args.lr}", file=sys.stderr)
    result = run(args.task, spec, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                 limit=args.limit or None, seed=args.seed, out_dir=out, progress=not args.no_progress,
                 checkpoint_every=args.checkpoint_every, **trainer_opts, **task_options)
    _report(result, out, args.json)
    return 0
