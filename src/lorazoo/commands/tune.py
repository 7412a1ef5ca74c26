"""lorazoo tune: propose a learning rate for a variant on a task or on your own model and data.

A short learning-rate range test (about a minute on CPU for MiniLM) combined with the best rates
of stored studies (see :mod:`lorazoo.tune`)::

    lorazoo tune --task sentiment --variant dora
    lorazoo tune --model DIR --data FILE --variant lora --out tune.json
    lorazoo tune --task sentiment --variant loraplus --prior runs/quick.sqlite
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .train import OWN_DATA_FLAGS as OWN  # the flags of your own model and data, as lorazoo train has them


def register(sub) -> None:
    from ..tune import RANGE, STUDY_GRID

    p = sub.add_parser("tune", help="propose a learning rate: a short range test plus stored studies as priors",
                       description="Run a short learning-rate range test (an exponentially growing rate, the "
                                   "loss smoothed, stopped when it diverges) for a variant on a task or on your "
                                   "own model and data, combine it with the best rates of stored studies, and "
                                   "propose a rate of the study grid.")
    p.add_argument("--task", default=None, help="task name (default: sentiment; 'own' with --model)")
    p.add_argument("--variant", default="lora", help="variant preset, see `lorazoo variants` (default: lora)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default: the preset's)")
    p.add_argument("--alpha", type=float, default=None, help="scale numerator (default: the preset's)")
    p.add_argument("--targets", default=None, help="comma-separated module names, a regex, or all-linear "
                                                   "(default: the task's)")
    p.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                   help="a spec option (e.g. loraplus_ratio=16); repeatable")
    own = p.add_argument_group("your own model and data (the 'own' task, as in lorazoo train)")
    own.add_argument("--model", default=None, metavar="DIR", help="a Hugging Face model folder or a .gguf file")
    own.add_argument("--data", default=None, metavar="FILE", help="training data (CSV, TSV, JSONL, Parquet, ...)")
    for flag in OWN[2:]:
        own.add_argument("--" + flag.replace("_", "-"), default=None,
                         type=float if flag == "eval_split" else str, help="as in lorazoo train")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (a task option)")
    p.add_argument("--task-option", action="append", default=None, metavar="KEY=VALUE",
                   help="a task option (e.g. test_size=400); repeatable")
    p.add_argument("--batch-size", type=int, default=8, help="the batch size the real run will use (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="training examples (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    rt = p.add_argument_group("the range test and the proposal")
    rt.add_argument("--steps", type=int, default=RANGE["steps"], help=f"range test steps (default: {RANGE['steps']})")
    rt.add_argument("--lr-min", type=float, default=RANGE["lr_min"], help=f"default: {RANGE['lr_min']:g}")
    rt.add_argument("--lr-max", type=float, default=RANGE["lr_max"], help=f"default: {RANGE['lr_max']:g}")
    rt.add_argument("--grid", default=None, metavar="LR,LR,...",
                    help=f"the rates to propose from (default: the study's, {','.join(f'{x:g}' for x in STUDY_GRID)})")
    rt.add_argument("--prior", default=None, metavar="FILE",
                    help="a study's .sqlite file or a trials.csv (default: the quick study shipped with lorazoo)")
    rt.add_argument("--no-prior", action="store_true", help="the range test alone")
    rt.add_argument("--exclude-variants", default=None, metavar="V,V,...",
                    help="ignore these variants' trials in the prior (leave-one-out checks)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the whole result (curve included) as JSON")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)


def _spec(args):
    from ..spec import AdapterSpec
    from .train import parse_options

    fields = {k: getattr(args, k) for k in ("rank", "alpha") if getattr(args, k) is not None}
    if args.targets is not None:
        fields["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()] if "," in args.targets \
            else args.targets
    fields.update(parse_options(args.option, "--option"))
    return AdapterSpec.preset(args.variant, seed=args.seed, **fields)


def _task(args) -> tuple[str, dict]:
    from ..errors import LorazooError
    from .train import parse_options

    opts = parse_options(args.task_option, "--task-option")
    own = {k: getattr(args, k) for k in OWN if getattr(args, k) is not None}
    if args.model is not None or args.task == "own":
        if args.task not in (None, "own"):
            raise LorazooError(f"--model and --data tune on your own model (the 'own' task); drop --task {args.task}")
        if args.model is None or (args.data is None and args.eval_data is None):
            raise LorazooError("your own model and data need both --model DIR and --data FILE")
        task = "own"
    else:
        if own:
            raise LorazooError(f"{', '.join('--' + k.replace('_', '-') for k in own)} need --model DIR "
                               f"(your own model and data)")
        task = args.task or "sentiment"
    opts.update(own)
    if args.max_length is not None:
        opts["max_length"] = args.max_length
    return task, opts


def _grid(text):
    from ..errors import LorazooError
    from ..tune import STUDY_GRID

    if text is None:
        return STUDY_GRID
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LorazooError(f"--grid takes comma-separated learning rates, got {text!r}") from None


def main(args) -> int:
    from ..errors import LorazooError
    from ..tune import DEFAULT_PRIOR, check_grid, propose_lr

    if args.no_prior and args.prior is not None:
        raise LorazooError("--prior and --no-prior exclude each other")
    if args.limit is not None and args.limit < 1:
        raise LorazooError(f"--limit must be >= 1, got {args.limit}")
    grid = check_grid(_grid(args.grid))
    spec = _spec(args)
    task, opts = _task(args)
    priors = None if args.no_prior else (args.prior or DEFAULT_PRIOR)
    exclude = [v.strip() for v in (args.exclude_variants or "").split(",") if v.strip()]
    print(f"lorazoo tune: range test of {args.variant} on {task if task != 'own' else args.data}, "
          f"{args.steps} steps from {args.lr_min:g} to {args.lr_max:g}, batch {args.batch_size}", file=sys.stderr)
    result = propose_lr(task, spec, variant=args.variant, grid=grid, priors=priors, exclude_variants=exclude,
                        steps=args.steps, lr_min=args.lr_min, lr_max=args.lr_max, batch_size=args.batch_size,
                        limit=args.limit, seed=args.seed, **opts)
    report(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"written: {args.out}")
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


def report(r: dict) -> None:
    """Print a proposal (the dict propose_lr returns) for people."""
    rt = r["range_test"]
    lrs, sm = rt["lrs"], rt["smoothed"]
    print(f"range test ({rt['steps_run']} steps, {rt['seconds']:.0f} s): smoothed loss "
          f"{sm[0]:.3f} at {lrs[0]:.1e}, lowest {rt['min_loss']:.3f} at {rt['lr_min_loss']:.1e}, "
          + (f"diverged at {rt['lr_div']:.1e}" if rt["lr_div"] is not None else "did not diverge"))
    every = max(1, len(lrs) // 12)
    print("  " + "  ".join(f"{lrs[i]:.0e}:{sm[i]:.3f}" for i in range(0, len(lrs), every)))
    print(f"range test alone: {r['range_test_lr_unsnapped']:.2e} -> {r['range_test_lr']:g}")
    p = r["prior"]
    if p is None:
        print("prior: none" + ("" if r["prior_source"] is None else f" ({r['prior_records']} stored trials say "
                                                                   f"nothing about this variant and task)"))
    else:
        print(f"prior ({p['kind']}, {len(p['evidence'])} sweep(s) of {r['prior_source']}): {p['lr']:.2e} "
              f"+- {p['sd']:.2f} decades, weight {r['weight_prior']:.2f}")
    note = " (capped below the divergence)" if r["capped"] else ""
    print(f"proposed learning rate for {r['variant']} on {r['task']}: {r['lr']:g} "
          f"(unsnapped {r['lr_unsnapped']:.2e}{note})")
