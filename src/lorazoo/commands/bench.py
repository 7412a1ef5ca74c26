"""lorazoo bench: training-step time, memory and inference cost of variants, optionally against PEFT."""
from __future__ import annotations

import dataclasses
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure step time, memory and merged inference of variants (vs LoRA, the floor, PEFT)",
        description="Time training steps (interleaved, rotated rounds), peak memory (fresh process per "
                    "method) and inference forwards of each variant on a random-init Llama; write "
                    "bench.md, bench.json and bench.png. A variant is a preset name, optionally with "
                    "parts or options changed: dora:init=pissa, lora:scale=rslora:rank=16, form=loha.")
    p.add_argument("--variants", help="comma-separated variants (default: every preset whose parts exist); "
                                      "lora is always added as the reference")
    p.add_argument("--against", choices=["peft"], action="append", default=[],
                   help="also run PEFT's implementation of each method it has (needs lorazoo[peft])")
    from ..study.bench_runner import BenchConfig

    d = BenchConfig()
    for name in ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq", "rank", "threads",
                 "rounds", "warmup", "mem_steps", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name),
                       help=f"default {getattr(d, name)}")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"default {d.alpha:g}")
    p.add_argument("--targets", default=",".join(d.targets), help="comma-separated module names")
    p.add_argument("--device", default=d.device,
                   help="where to run (default cpu; cuda: times synchronize the device, memory is its peak "
                        "allocation)")
    p.add_argument("--paper-ranks", action="store_true",
                   help="also run each preset that has its paper's own rank (vera 256, randlora 32, ...) at it")
    p.add_argument("--compile", action="store_true",
                   help="also time each lorazoo method under torch.compile (rows 'lorazoo+compile', compiled "
                        "before timing) and report compiled / eager")
    p.add_argument("--compile-backend", default=d.compile_backend,
                   help=f"torch.compile backend of --compile (default {d.compile_backend}; aot_eager skips codegen)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--mem-jobs", type=int, default=2,
                   help="memory subprocesses at once (peak RSS is per process; default 2)")
    p.add_argument("--mixed", type=int, metavar="K",
                   help="instead: K LoRA adapters served one per sample (mixed_batch) vs PEFT's adapter_names "
                        "and the base; use with --batch 32; writes mixed.md")
    p.add_argument("--mixed-seqs", metavar="S1,S2,...",
                   help="with --mixed: tokens per sample to sweep, one table row group each (default: --seq)")
    p.add_argument("--quant", action="store_true",
                   help="instead: SmolLM2-135M's base in fp32, bf16, NF4 (bitsandbytes, torchao) and int8 (weight "
                        "bytes, RSS) and LoRA's step time and peak RSS on fp32, bf16 and NF4 bases; uses --batch, "
                        "--seq, --rank, --rounds...; writes quant.md and quant.json (default folder docs/bench/quant)")
    p.add_argument("--out", default=None,
                   help="folder for bench.md/.json/.png (default docs/bench; docs/bench/quant with --quant)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import SpecError
    from ..study.bench import run_bench
    from ..study.bench_report import write
    from ..study.bench_runner import BenchConfig

    fields = ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq", "rank", "alpha",
              "threads", "rounds", "warmup", "mem_steps", "seed")
    cfg = BenchConfig(**{f: getattr(args, f) for f in fields},
                      targets=[t.strip() for t in args.targets.split(",") if t.strip()],
                      compile_backend=args.compile_backend, device=args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.quant:
        from ..study.bench_quant import run_quant, write_quant

        if args.device != "cpu":
            raise SpecError("--quant measures CPU bases (bitsandbytes' and torchao's CPU kernels, RSS); "
                            "run it without --device")

        result = run_quant(cfg, memory=not args.no_memory, jobs=args.mem_jobs, log=log)
        print(write_quant(result, args.out or "docs/bench/quant").read_text())
        return 0
    out = args.out or "docs/bench"
    if args.mixed:
        from ..study.bench_mixed import run_mixed, write_mixed

        seqs = [int(x) for x in args.mixed_seqs.split(",") if x.strip()] if args.mixed_seqs else [cfg.seq]
        if not seqs or min(seqs) < 1:
            raise SystemExit(f"lorazoo bench: --mixed-seqs must list positive integers, got {args.mixed_seqs!r}")
        runs = [run_mixed(dataclasses.replace(cfg, seq=n), args.mixed, log=log) for n in seqs]
        path = write_mixed(runs, out)
        print(path.read_text())
        return 0

    result = run_bench(cfg, variants, against=args.against, memory=not args.no_memory,
                       mem_jobs=args.mem_jobs, paper_ranks=args.paper_ranks, compile=args.compile, log=log)
    paths = write(result, out)
    if "png" not in paths:
        log("bench.png not written: the chart needs matplotlib (pip install 'lorazoo[study]')")
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
