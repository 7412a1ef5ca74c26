"""lorazoo train: train one adapter on a task, print the metric before and after, save it.

With no arguments it runs the embedded default job: LoRA r=8 on the sentiment task, sized to take
a few minutes on 2 CPU cores. ``--model DIR --data FILE`` trains on your own Hugging Face model
and data file instead (the ``own`` task, :mod:`lorazoo.tasks.own_data`). ``--config run.yaml``
reads any of the flags from a YAML file (keys are the flag names); flags given on the command line
override it. ``--checkpoint-every N`` writes a training checkpoint every N steps into
OUT/checkpoints; ``lorazoo train --resume OUT`` continues such a run, killed at any moment, from
its newest checkpoint, with the settings it was started with (OUT/run.json).

The output folder holds the adapter, ``task.json`` and ``result.json`` (see :func:`lorazoo.run.run`),
``config.yaml`` (every setting of the run, resolved: ``lorazoo train --config OUT/config.yaml``
runs it again), ``metrics.json`` (the metrics before and after training, per epoch, and the loss
per step) and ``training.png`` (loss per step and the metric per epoch).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The embedded default job (see the module docstring); every value can be overridden by a flag.
DEFAULTS = {"task": "sentiment", "variant": "lora", "rank": 8, "alpha": 16, "lr": 2e-3, "epochs": 1.0,
            "batch_size": 16, "limit": 4000, "seed": 0}
PART_FLAGS = ("form", "init", "scale", "optim", "schedule")
# What a flag left unset means (the parser's own defaults are all None, so that a flag given on the
# command line is told apart from a config file's value and from the default). lr, epochs,
# batch_size and limit come from the task's run_defaults, else DEFAULTS; rank, alpha, rank_dropout
# and targets from the preset (and the task).
FLAG_DEFAULTS = {"task": DEFAULTS["task"], "variant": DEFAULTS["variant"], "seed": DEFAULTS["seed"],
                 "accumulation": 1, "lr_schedule": "linear", "warmup": 0.1, "weight_decay": 0.0,
                 "option": {}, "task_option": {}, "no_progress": False, "json": False}
# Flags that describe your own model and data: task options of the "own" task.
OWN_DATA_FLAGS = ("model", "data", "eval_data", "eval_split", "task_type", "text_column", "label_column",
                  "prompt_column", "response_column")
TASK_FLAGS = OWN_DATA_FLAGS + ("max_length",)   # flags that become task options
NOT_IN_CONFIG = ("config", "resume")             # flags a config file cannot hold
DISPLAY_FLAGS = ("no_progress", "json", "nproc")  # not written into OUT/config.yaml
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"


def register(sub) -> None:
    p = sub.add_parser("train", help="train an adapter on a task (or your own model and data) and save it",
                       description="Train one adapter (a variant preset, or its parts) on a task, or on your own "
                                   "Hugging Face model and data file (--model DIR --data FILE). With no arguments: "
                                   "LoRA r=8 on the sentiment task, a few minutes on CPU. --config run.yaml holds "
                                   "any of these flags (keys are the flag names); flags given here override it.")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="read the run's settings from a YAML file whose keys are these flags' names "
                        "(e.g. batch_size, lr_schedule, option: {loraplus_ratio: 16}); flags given override it")
    p.add_argument("--task", default=None, help=f"task name (default: {DEFAULTS['task']}; 'own' with --model)")
    p.add_argument("--variant", default=None, help=f"variant preset, see `lorazoo variants` (default: "
                                                   f"{DEFAULTS['variant']})")
    for part in PART_FLAGS:
        p.add_argument(f"--{part}", help=f"override the preset's {part} part")
    p.add_argument("--rank", type=int, default=None,
                   help="adapter rank (default: the preset's, e.g. VeRA's 256, else 8)")
    p.add_argument("--alpha", type=float, default=None, help="scale numerator (default: the preset's, else 16)")
    p.add_argument("--rank-dropout", type=float, default=None, help="DropLoRA rank dropout (default: the preset's)")
    p.add_argument("--targets", default=None,
                   help="comma-separated module names, a regex, or all-linear (default: the task's)")
    own = p.add_argument_group("your own model and data (the 'own' task)")
    own.add_argument("--model", default=None, metavar="DIR",
                     help="a Hugging Face model folder (config.json, weights, tokenizer) or a .gguf file")
    own.add_argument("--data", default=None, metavar="FILE",
                     help="training data: CSV, TSV, JSONL, Parquet or a datasets save_to_disk folder")
    own.add_argument("--eval-data", default=None, metavar="FILE", help="evaluation data (default: --eval-split)")
    own.add_argument("--eval-split", type=float, default=None,
                     help="fraction of --data held out for evaluation when --eval-data is not given (default: 0.1)")
    own.add_argument("--task-type", default=None, choices=("classification", "causal-lm"),
                     help="default: causal-lm for a ...ForCausalLM model, else classification")
    own.add_argument("--text-column", default=None, help="the text (default: text)")
    own.add_argument("--label-column", default=None, help="classification labels, strings or ints (default: label)")
    own.add_argument("--prompt-column", default=None, help="causal LM: the prompt (no loss on it)")
    own.add_argument("--response-column", default=None, help="causal LM: the response (the loss covers it)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (a task option; default: the task's, 128 for own data)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: the task's run_defaults, else {DEFAULTS['lr']})")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"may be fractional (default: the task's run_defaults, else {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"(default: the task's run_defaults, else {DEFAULTS['batch_size']})")
    p.add_argument("--accumulation", type=int, default=None, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--lr-schedule", default=None, choices=("linear", "cosine", "constant"),
                   help="decay after warmup (default: linear)")
    p.add_argument("--warmup", type=float, default=None,
                   help="warmup: a fraction of the steps, or steps if >= 1 (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: 0.0)")
    p.add_argument("--limit", type=int, default=None,
                   help=f"training examples (default: the task's run_defaults, else {DEFAULTS['limit']}; "
                        f"all of your own data; 0 = all)")
    p.add_argument("--seed", type=int, default=None, help=f"(default: {DEFAULTS['seed']})")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/<task>-<variant>, runs/own-<data file>-<variant>); it gets the "
                        "adapter, task.json, result.json, config.yaml, metrics.json and training.png")
    p.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                   help="a part option, e.g. loraplus_ratio=16 (repeatable)")
    p.add_argument("--task-option", action="append", default=None, metavar="KEY=VALUE",
                   help="a task option, e.g. max_length=64 or test_size=1000 (repeatable)")
    p.add_argument("--quantize", default=None, choices=("nf4", "fp4", "int8", "torchao-nf4"),
                   help="QLoRA: quantize the model's linear layers (bitsandbytes nf4/fp4/int8, or torchao nf4; "
                        "pip install 'lorazoo[quant]') before adapting (default: full precision)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a training checkpoint every N steps into OUT/checkpoints (default: none)")
    p.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run saved in OUT (started with --checkpoint-every) from its newest "
                        "checkpoint, with the settings it was started with; takes no other run flags")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N local processes (torch.distributed, gloo, CPU: DDP, each its share of every "
                        "batch; the same result as one process); rank 0 writes OUT (default: 1)")
    p.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    p.add_argument("--json", action="store_true", default=None, help="print the full result as JSON at the end")
    p.set_defaults(func=main, _parser=p)


def parse_options(pairs, flag: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; values are read as JSON when they parse.
    A dict (from a config file) is returned as it is."""
    from ..errors import LorazooError

    if isinstance(pairs, dict):
        return dict(pairs)
    out = {}
    for pair in pairs or ():
        key, eq, value = str(pair).partition("=")
        if not eq or not key.strip():
            raise LorazooError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# --- flags, config file, defaults ---------------------------------------------------------------
def _actions(parser) -> dict:
    """dest -> argparse action of every flag a run takes."""
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "func", "_parser") and a.option_strings}


def read_config(path, parser) -> dict:
    """The flags a YAML config file sets, checked and converted like the command line's."""
    import yaml

    from ..errors import LorazooError

    f = Path(path)
    if not f.is_file():
        raise LorazooError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(f.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LorazooError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LorazooError(f"config file {str(path)!r} must be a mapping of flag names to values, "
                           f"got {type(raw).__name__}")
    actions = _actions(parser)
    known = sorted(d for d in actions if d not in NOT_IN_CONFIG)
    out, unknown = {}, []
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            unknown.append(str(key))
            continue
        out[dest] = _config_value(dest, value, actions[dest], f)
    if unknown:
        raise LorazooError(f"config file {str(path)!r}: unknown key(s) {', '.join(unknown)}; known keys: "
                           f"{', '.join(known)}")
    return out


def _config_value(dest: str, value, action, f):
    """A config value as the flag would give it (YAML reads 1e-3 as a string: converted here)."""
    from ..errors import LorazooError

    where = f"config file {str(f)!r}, key {dest}"
    if value is None:
        return None
    if dest in ("option", "task_option"):
        if isinstance(value, dict):  # string values are read as JSON when they parse, as on the command line
            return {str(k): (_json_or_str(v) if isinstance(v, str) else v) for k, v in value.items()}
        if isinstance(value, list):
            return parse_options(value, f"{where}:")
        raise LorazooError(f"{where}: must be a mapping (e.g. {{loraplus_ratio: 16}}), got {value!r}")
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise LorazooError(f"{where}: must be true or false, got {value!r}")
        return value
    if dest == "targets" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    kind = action.type
    if kind in (int, float):
        if isinstance(value, bool):
            raise LorazooError(f"{where}: must be a number, got {value!r}")
        try:
            converted = kind(value) if isinstance(value, str) or kind is float else value
        except ValueError:
            raise LorazooError(f"{where}: must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and (not isinstance(converted, int) and not (isinstance(converted, float) and converted.is_integer())):
            raise LorazooError(f"{where}: must be an integer, got {value!r}")
        value = kind(converted)
    elif not isinstance(value, str):
        raise LorazooError(f"{where}: must be a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise LorazooError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def resolve_flags(args) -> None:
    """Merge defaults < config file < command line into ``args`` (in place)."""
    from ..errors import LorazooError

    parser = args._parser
    actions = _actions(parser)
    given = {d: getattr(args, d) for d in actions if getattr(args, d, None) is not None}
    config = read_config(args.config, parser) if args.config else {}
    config = {k: v for k, v in config.items() if v is not None}
    merged = {d: None for d in actions}
    merged.update(FLAG_DEFAULTS)
    merged.update(config)
    merged.update(given)
    for key in ("option", "task_option"):
        merged[key] = {**parse_options(config.get(key, {}), f"--{key.replace('_', '-')}"),
                       **parse_options(given.get(key, []), f"--{key.replace('_', '-')}")}
    for dest, value in merged.items():
        setattr(args, dest, value)
    own = [d for d in OWN_DATA_FLAGS if merged[d] is not None]
    task_given = "task" in given or "task" in config
    if merged["model"] is not None or (task_given and merged["task"] == "own"):
        if task_given and merged["task"] != "own":
            raise LorazooError(f"--model and --data train your own model (the 'own' task); drop --task "
                               f"{merged['task']}")
        args.task = "own"
    elif own:
        raise LorazooError(f"{', '.join('--' + d.replace('_', '-') for d in own)} need --model DIR "
                           f"(your own model and data)")
    for d in ("model", "data", "eval_data"):  # recorded absolute: `lorazoo eval` may run elsewhere
        if isinstance(getattr(args, d), str):
            setattr(args, d, os.path.abspath(os.path.expanduser(getattr(args, d))))


def task_options(args) -> dict:
    """--task-option pairs plus the flags that are task options (the flags win)."""
    from ..errors import LorazooError
    from ..run import TRAINER_OPTIONS

    opts = dict(args.task_option)
    clash = sorted(set(opts) & set(TRAINER_OPTIONS))
    if clash:
        raise LorazooError(f"{', '.join(clash)} are trainer options: use their flags, not --task-option")
    opts.update({d: getattr(args, d) for d in TASK_FLAGS if getattr(args, d) is not None})
    return opts


def build_spec(args):
    """The AdapterSpec the flags describe (validated: unknown variants, parts, options raise)."""
    from ..spec import AdapterSpec

    fields = {part: getattr(args, part) for part in PART_FLAGS if getattr(args, part) is not None}
    fields.update({k: getattr(args, k) for k in ("rank", "alpha") if getattr(args, k) is not None}, seed=args.seed)
    if args.rank_dropout is not None:
        fields["rank_dropout"] = args.rank_dropout
    if args.targets is not None:
        fields["targets"] = args.targets if not isinstance(args.targets, str) or "," not in args.targets else [
            t.strip() for t in args.targets.split(",") if t.strip()]
    fields.update(parse_options(args.option, "--option"))
    return AdapterSpec.preset(args.variant, **fields)


def run_name(args) -> str:
    parts = [f"{p}={getattr(args, p)}" for p in PART_FLAGS if getattr(args, p) is not None]
    task = args.task
    if task == "own" and getattr(args, "data", None):
        task = f"own-{Path(args.data).stem}"
    return "-".join([task, args.variant, *parts])


def resolve_run_defaults(args) -> None:
    """Fill --lr, --epochs, --batch-size, --limit left unset: the task's ``run_defaults``, else DEFAULTS."""
    from ..tasks.base import task_class

    task_defaults = getattr(task_class(args.task), "run_defaults", {}) or {}
    for key in ("lr", "epochs", "batch_size", "limit"):
        if getattr(args, key) is None:
            setattr(args, key, task_defaults.get(key, DEFAULTS[key]))


def resolved_config(args, spec, task=None) -> dict:
    """Every setting of the run (what OUT/config.yaml holds; ``--config`` on it runs it again); the
    own-data task's resolved columns, task type and max_length included."""
    if task is not None and args.task == "own":
        lm = task.opts.get("task_type") == "causal-lm"
        for d in TASK_FLAGS:
            if d == "label_column" and lm:
                continue
            if getattr(args, d) is None and task.opts.get(d) is not None and d not in args.task_option:
                setattr(args, d, task.opts[d])
    out = {}
    for dest in _actions(args._parser):
        if dest in NOT_IN_CONFIG or dest in DISPLAY_FLAGS:
            continue
        value = getattr(args, dest, None)
        if value is None or value == {}:
            continue
        out[dest] = value
    out.update({part: getattr(spec, part) for part in PART_FLAGS})
    out.update(rank=spec.rank, alpha=spec.alpha, rank_dropout=spec.rank_dropout, targets=spec.targets)
    if out.get("task") != "own":
        for d in OWN_DATA_FLAGS:
            out.pop(d, None)
    return out


# --- output files -------------------------------------------------------------------------------
def write_config(out, config: dict) -> None:
    from ..files import _atomic

    try:
        import yaml
    except ImportError:  # PyYAML comes with the `tasks` extra
        print(f"lorazoo train: no {CONFIG_FILE} written (pip install pyyaml)", file=sys.stderr)
        return

    Path(out).mkdir(parents=True, exist_ok=True)
    text = ("# lorazoo train: the run's settings, resolved (lorazoo train --config this-file runs it again)\n"
            + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    _atomic(Path(out) / CONFIG_FILE, lambda f: Path(f).write_text(text))


def write_metrics(out, result: dict) -> None:
    """OUT/metrics.json (metrics before and after, per epoch, loss per step) and OUT/training.png."""
    from ..files import _atomic

    keys = ("task", "metric_name", "metric_before", "metric", "metrics_before", "metrics_per_epoch", "steps",
            "train_seconds", "trainable_params", "losses")
    metrics = {k: result[k] for k in keys if k in result}
    metrics["metrics_after"] = result["metrics_per_epoch"][-1] if result.get("metrics_per_epoch") else None
    _atomic(Path(out) / METRICS_FILE, lambda f: Path(f).write_text(json.dumps(metrics, indent=1)))
    write_plot(Path(out) / PLOT_FILE, result)


def write_plot(path: Path, result: dict) -> bool:
    """Loss per step (with a moving average) and the primary metric per epoch; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lorazoo train: no training plot (pip install matplotlib)", file=sys.stderr)
        return False
    losses = result.get("losses") or []
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = range(1, len(losses) + 1)
    a.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    w = max(1, len(losses) // 20)
    if w > 1:
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1])
                  for i in range(len(losses))]
        a.plot(steps, smooth, lw=1.6, label=f"mean of {w}")
    a.set_xlabel("optimizer step")
    a.set_ylabel("training loss")
    a.legend(fontsize=8)
    m = result["metric_name"]
    per_epoch = result.get("metrics_per_epoch") or []
    xs = [0.0] + [float(e.get("epoch", i + 1)) for i, e in enumerate(per_epoch)]
    ys = [result["metric_before"]] + [float(e[m]) for e in per_epoch]
    b.plot(xs, ys, marker="o")
    b.set_xlabel("epoch")
    b.set_ylabel(f"eval {m}")
    fig.suptitle(f"{result.get('task', '')}: {result['spec']['form']} r={result['spec']['rank']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- the command --------------------------------------------------------------------------------
# flags --resume may be given with: they do not change the run
RESUME_FLAGS = {"resume", "no_progress", "json", "func", "_parser", "command", "nproc"}


def resume_main(args) -> int:
    """``lorazoo train --resume OUT``: rerun ``run`` with the arguments stored in OUT/run.json."""
    from ..errors import LorazooError
    from ..run import RUN_FILE, read_run_arguments, run
    from ..spec import AdapterSpec

    given = sorted("--" + k.replace("_", "-") for k, v in vars(args).items()
                   if k not in RESUME_FLAGS and v is not None)
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
    result = _runner(args, run)(task, spec, out_dir=args.resume, progress=not args.no_progress, resume=True,
                                **kwargs)
    write_metrics(args.resume, result)
    _report(result, args.resume, args.json)
    return 0


def _runner(args, run):
    """``run``, or ``run`` in ``--nproc`` processes (lorazoo.run.spawn_run)."""
    nproc = getattr(args, "nproc", None)
    if nproc is None or nproc == 1:
        return run
    import functools

    from ..run import spawn_run

    return functools.partial(spawn_run, nproc)


def _report(result: dict, out, as_json: bool) -> None:
    m = result["metric_name"]
    print(f"{m} before: {result['metric_before']:.4f}")
    print(f"{m} after:  {result['metric']:.4f}")
    print(f"trained {result['steps']} steps in {result['train_seconds']:.1f} s, "
          f"{result['trainable_params']:,} trainable parameters; adapter saved to {out}")
    summary = result.get("schedule_summary")
    if summary is not None and "ranks" in summary:  # rank allocators: the final ranks per layer
        print(f"ranks per layer ({summary['total']} of {summary['capacity']} active): "
              + ", ".join(f"{p}={n}" for p, n in summary["ranks"].items()))
    if summary is not None and "intervals" in summary:  # E2LoRA: the sharing intervals and their ranks
        print(f"sharing intervals ({len(summary['intervals'])}; rank each): "
              + ", ".join(f"{p}={n}" for p, n in summary["intervals"].items()))
    if as_json:
        print(json.dumps(result, indent=1))


def main(args) -> int:
    from ..errors import LorazooError
    from ..run import run, with_task_defaults
    from ..tasks.base import get_task
    from ..train import check_trainer_options

    if getattr(args, "resume", None) is not None:
        return resume_main(args)
    resolve_flags(args)
    spec = build_spec(args)
    resolve_run_defaults(args)
    if args.limit is not None and args.limit < 0:
        raise LorazooError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    opts = task_options(args)
    task = get_task(args.task, limit=args.limit or None, seed=args.seed, options=opts)  # validates, reads the data
    spec = with_task_defaults(spec, task)  # as run() does, so the written config says what runs
    trainer_opts = {"lr_schedule": args.lr_schedule, "warmup": args.warmup, "accumulation": args.accumulation,
                    "weight_decay": args.weight_decay}
    check_trainer_options(lr=args.lr, epochs=args.epochs, checkpoint_every=args.checkpoint_every, **trainer_opts)
    out = args.out or f"runs/{run_name(args)}"
    write_config(out, resolved_config(args, spec, task))

    what = args.task
    if args.task == "own":
        what = f"{args.data} ({task.opts['task_type']}, model {args.model})"
    print(f"lorazoo train: {args.variant} ({spec.form}/{spec.init}/{spec.scale}/{spec.optim}/{spec.schedule}) "
          f"r={spec.rank} alpha={spec.alpha} on {what}, limit={args.limit or 'all'}, epochs={args.epochs}, "
          f"lr={args.lr}", file=sys.stderr)
    result = _runner(args, run)(args.task, spec, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                 limit=args.limit or None, seed=args.seed, out_dir=out, progress=not args.no_progress,
                 checkpoint_every=args.checkpoint_every, **trainer_opts, **opts,
                 **({"quantize": args.quantize} if args.quantize is not None else {}))
    write_metrics(out, result)
    _report(result, out, args.json)
    return 0
