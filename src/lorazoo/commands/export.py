"""lorazoo export: a saved run written for use without lorazoo (a merged model folder, or PEFT's files)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="write a saved run as a merged model folder (or PEFT adapter files)",
                       description="Load the adapter in FOLDER onto a fresh base model of its task (as `lorazoo "
                                   "eval` does) and write it into the new folder OUT. --format merged (default): "
                                   "the adapter folded into the base weights, saved with the model's own "
                                   "save_pretrained and the tokenizer beside it, for from_pretrained anywhere. "
                                   "--format peft: PEFT's adapter_model.safetensors and adapter_config.json, for "
                                   "PeftModel.from_pretrained on the same base model (the methods PEFT has).")
    p.add_argument("folder", help="a folder written by `lorazoo train` (adapter + task.json)")
    p.add_argument("out", help="the folder to write (new, or empty)")
    p.add_argument("--format", choices=("merged", "peft"), default="merged", help="what to write (default merged)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..run import export_saved

    files = export_saved(args.folder, args.out, format=args.format)
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0
