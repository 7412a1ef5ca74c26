"""The overhead benchmark behind ``lorazoo bench``: step time, memory and inference cost of methods.

For a list of specs (preset names, or presets with parts and options changed: ``dora:init=pissa``,
``form=loha:rank=4``) on one model, it measures

- trainable parameters;
- the median training-step time (forward, backward, AdamW step and the adapter's hooks) over
  ``rounds`` rounds after ``warmup`` rounds; every method's model is built once and kept, methods
  are interleaved within a round and the order is rotated from round to round, so drift in the
  machine's speed falls on all methods alike;
- the peak-memory overhead of each method in a fresh subprocess (:mod:`.bench_mem`);
- the inference forward time, unmerged and (for mergeable forms) merged, interleaved the same way;

and the same for the *floor*: the frozen base with gradients flowing to its inputs only, which no
adapter can beat. Ratios are taken to lorazoo's LoRA, to the floor, and (for PEFT rows) to PEFT's
own LoRA. ``against=("peft",)`` adds PEFT's implementation of every method PEFT has.
``compile=True`` adds each lorazoo method under ``torch.compile`` (impl "lorazoo+compile", its own
LoRA being the compiled LoRA) and its ratio to the eager row (``step_vs_eager``).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Callable, Iterable

import torch

from ..errors import LorazooError, SpecError
from .bench_build import build_runner
from .bench_runner import COMPILED, FLOOR, BenchConfig, Method, Runner, make_batch, timed

REFERENCE = "lora"


# --- which methods ----------------------------------------------------------------------------
def _value(text: str):
    """A command-line option value: JSON where it parses (numbers, true, lists), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_spec(item: str, cfg: BenchConfig):
    """``preset[:key=value...]`` or ``key=value[:key=value...]`` (from LoRA) -> AdapterSpec.

    Rank, alpha and targets come from the benchmark config unless the item sets them.
    """
    from ..spec import AdapterSpec

    head, *rest = item.split(":")
    preset, pairs = ("lora", [head, *rest]) if "=" in head else (head, rest)
    overrides = {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"bench variant {item!r}: expected key=value after ':', got {pair!r}")
        overrides[key] = _value(val)
    return AdapterSpec.preset(preset, **overrides)


def available_variants() -> tuple[list[str], dict[str, str]]:
    """Presets whose parts are all registered now, and the reason each other one is not."""
    from ..presets import PRESETS
    from ..spec import AdapterSpec

    ok, skipped = [], {}
    for name in PRESETS:
        try:
            AdapterSpec.preset(name)
            ok.append(name)
        except SpecError as e:
            skipped[name] = str(e)
    return ok, skipped


def at_paper_ranks(variants: Iterable[str], rank: int) -> list[str]:
    """Each variant, followed by ``name:rank=R`` where its preset carries its paper's rank R != rank
    (VeRA 256, RandLoRA 32, ...), so each method runs at r = ``rank`` and at its paper's usual rank."""
    from ..presets import PRESETS

    out = []
    for v in variants:
        out.append(v)
        paper = PRESETS[v].parts.get("rank") if v in PRESETS else None
        if paper is not None and paper != rank:
            out.append(f"{v}:rank={paper}")
    return out


def plan(cfg: BenchConfig, variants: Iterable[str] | None = None,
         against: Iterable[str] = (), paper_ranks: bool = False,
         compile: bool = False) -> tuple[list[Method], dict[str, str]]:
    """The floor, lorazoo's methods (LoRA first, always there) and PEFT's; and what was skipped.
    With ``paper_ranks``, presets with a paper rank of their own run at it too (:func:`at_paper_ranks`)."""
    skipped: dict[str, str] = {}
    if variants is None:
        variants, skipped = available_variants()
    if paper_ranks:
        variants = at_paper_ranks(variants, cfg.rank)
    labels = list(dict.fromkeys([REFERENCE, *variants]))
    ours = [Method(label, "lorazoo", parse_spec(label, cfg).to_dict()) for label in labels]
    refused = _refused_by_the_model(ours, cfg)
    skipped.update(refused)
    ours = [m for m in ours if m.key not in refused]
    methods = [FLOOR, *ours]
    if compile:
        methods += [Method(m.label, COMPILED, m.spec) for m in ours]
    for impl in against:
        if impl != "peft":
            raise SpecError(f"--against knows only 'peft', got {impl!r}")
        from .bench_peft import peft_equivalent

        for m in ours:
            config, reason = peft_equivalent(m.adapter_spec(), cfg)
            if config is None:
                skipped[f"peft:{m.label}"] = reason
            else:
                methods.append(Method(m.label, "peft", m.spec))
        if not any(m.impl == "peft" and m.label == REFERENCE for m in methods):
            raise LorazooError("PEFT's LoRA could not be set up; it is the reference of the PEFT rows")
    return methods, skipped


def _refused_by_the_model(methods: list[Method], cfg: BenchConfig) -> dict[str, str]:
    """Methods whose parts refuse the bench's Llama itself (BitFit: it has no biases), with the reason,
    found before any timing or memory process starts."""
    from ..parts import Part
    from .bench_runner import build_base

    base, out = None, {}
    for m in methods:
        spec = m.adapter_spec()
        for part in spec.part_classes().values():
            own = getattr(getattr(part, "select_saved", None), "__func__", None)
            if own is None or own is Part.select_saved.__func__:
                continue  # not a Part class, or the default: adapts layers only, nothing model-specific
            base = base if base is not None else build_base(cfg)
            try:
                part.select_saved(base, spec)
            except SpecError as e:
                out[m.key] = str(e)
    return out


# --- measurements -----------------------------------------------------------------------------
def measure_memory(methods: list[Method], cfg: BenchConfig, jobs: int = 1,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Peak-memory overhead of each method, each in its own fresh Python process.

    Peak RSS is per process, so ``jobs`` processes may run at once without changing the result.
    """
    def one(m: Method) -> dict:
        job = json.dumps({"config": asdict(cfg), "method": m.to_dict()})
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        p = subprocess.run([sys.executable, "-m", "lorazoo.study.bench_mem", job],
                           capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise LorazooError(f"memory measurement of {m.key} failed:\n{p.stderr.strip()[-2000:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        log(f"memory  {m.key:<28} overhead {res['overhead_mb']:8.1f} MB")
        return res

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip((m.key for m in methods), pool.map(one, methods)))


def interleaved(runners: list[Runner], measure: Callable[[Runner], dict[str, float]],
                rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Call ``measure`` on every runner once per round, the order rotated by one each round;
    keep the samples of the rounds after ``warmup``: {method key: {quantity: [seconds...]}}."""
    samples: dict[str, dict[str, list[float]]] = {r.method.key: {} for r in runners}
    for rnd in range(warmup + rounds):
        k = rnd % len(runners)
        gc.collect()
        for r in runners[k:] + runners[:k]:
            got = measure(r)
            if rnd >= warmup:
                for name, t in got.items():
                    samples[r.method.key].setdefault(name, []).append(t)
    return samples


def _time_forward(r: Runner) -> dict[str, float]:
    out = {"fwd": timed(r.forward)}
    if r.mergeable:
        r.merge()
        out["fwd_merged"] = timed(r.forward)
        r.unmerge()
    return out


def summary(xs: list[float] | None) -> tuple[float | None, float | None]:
    """(median, interquartile range / median) of timing samples."""
    if not xs:
        return None, None
    med = statistics.median(xs)
    if len(xs) < 2 or med <= 0:
        return med, 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return med, (q[2] - q[0]) / med


# --- ratios -----------------------------------------------------------------------------------
def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def add_ratios(rows: list[dict]) -> None:
    """Ratios of each row to lorazoo's LoRA, to the floor, and to its own implementation's LoRA."""
    by_key = {r["key"]: r for r in rows}
    lora, floor = by_key[f"lorazoo:{REFERENCE}"], by_key[FLOOR.key]
    for r in rows:
        own = by_key.get(f"{r['impl']}:{REFERENCE}", lora)
        for q, stem in (("step_s", "step"), ("overhead_mb", "mem"), ("saved_mb", "saved")):
            r[f"{stem}_vs_lora"] = _ratio(r.get(q), lora.get(q))
            r[f"{stem}_vs_floor"] = _ratio(r.get(q), floor.get(q))
            r[f"{stem}_vs_own_lora"] = _ratio(r.get(q), own.get(q))
        r["trainable_vs_lora"] = _ratio(r["trainable"], lora["trainable"])
        if r["impl"] == COMPILED:  # compiled against the same method eager
            eager = by_key.get(f"lorazoo:{r['variant']}", {})
            for q, stem in (("step_s", "step"), ("fwd_s", "fwd"), ("overhead_mb", "mem")):
                r[f"{stem}_vs_eager"] = _ratio(r.get(q), eager.get(q))
        r["fwd_vs_base"] = _ratio(r.get("fwd_s"), floor.get("fwd_s"))
        r["merged_fwd_vs_base"] = _ratio(r.get("fwd_merged_s"), floor.get("fwd_s"))


def environment(cfg: BenchConfig) -> dict:
    """Versions and machine facts that a reader needs to judge the numbers."""
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpus": os.cpu_count(), "threads": cfg.threads}
    if torch.device(cfg.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(cfg.device)
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    return env


def _time_all(methods: list[Method], cfg: BenchConfig, log: Callable[[str], None]):
    """Build every method's model once, then time training steps and forwards, interleaved."""
    batch = make_batch(cfg)
    runners = []
    for m in methods:
        runners.append(build_runner(m, cfg, batch))
        log(f"built   {m.key:<28} trainable {runners[-1].trainable:,}")
    log(f"timing training steps: {len(runners)} methods x ({cfg.warmup} warm-up + {cfg.rounds}) rounds")
    steps = interleaved(runners, lambda r: {"step": timed(r.step)}, cfg.rounds, cfg.warmup)
    log("timing inference forwards (unmerged, merged)")
    fwds = interleaved(runners, _time_forward, cfg.rounds, cfg.warmup)
    return runners, steps, fwds


# --- the whole run ----------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, variants: Iterable[str] | None = None, against: Iterable[str] = (),
              memory: bool = True, mem_jobs: int = 1, paper_ranks: bool = False, compile: bool = False,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Plan, measure memory (subprocesses), then time all methods in this process; return the result."""
    methods, skipped = plan(cfg, variants, against, paper_ranks, compile)
    for name, why in skipped.items():
        log(f"skipped {name}: {why}")
    load_before = os.getloadavg()
    mem = measure_memory(methods, cfg, mem_jobs, log) if memory else {}

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        runners, steps, fwds = _time_all(methods, cfg, log)
    finally:
        torch.set_num_threads(threads)

    rows = []
    for r in runners:
        key = r.method.key
        row = {"key": key, "variant": r.method.label, "impl": r.method.impl, "spec": r.method.spec,
               "trainable": r.trainable, "mergeable": r.mergeable}
        for name, src in (("step", steps), ("fwd", fwds), ("fwd_merged", fwds)):
            med, spread = summary(src[key].get(name))
            row[f"{name}_s"], row[f"{name}_spread"] = med, spread
            row[f"{name}_samples"] = src[key].get(name)
        row.update(mem.get(key, {}))
        for note in r.notes:  # the compiled rows' compile time
            if isinstance(note, dict):
                row.update(note)
        rows.append(row)
    add_ratios(rows)
    env = environment(cfg)
    env["loadavg_before"], env["loadavg_after"] = load_before, os.getloadavg()
    return {"config": asdict(cfg), "environment": env, "rows": rows, "skipped": skipped}
