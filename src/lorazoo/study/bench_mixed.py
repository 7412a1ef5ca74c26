"""``lorazoo bench --mixed K``: K LoRA adapters served at once, one per sample (lorazoo.mixed_batch),
against PEFT's ``adapter_names=`` on the same model and adapters, and against the base alone.

Each round times one inference forward (no grad, eval mode) of each way, interleaved; the medians
give throughput in samples per second. The adapters are random (nonzero B) so no path can skip them;
before timing, lorazoo's and PEFT's outputs are checked equal within float32 rounding.
"""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Callable

import torch

from .bench_runner import BenchConfig, build_base, make_batch, timed


def run_mixed(cfg: BenchConfig, adapters: int = 8, log: Callable[[str], None] = print) -> dict:
    import lorazoo
    from lorazoo.mixed import mixed_batch

    torch.set_num_threads(cfg.threads)
    batch = make_batch(cfg)["input_ids"]
    names = [f"a{i % adapters}" for i in range(cfg.batch)]
    base = build_base(cfg).eval()
    ours = copy.deepcopy(base)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    for i in range(adapters):
        h = lorazoo.adapt(ours, lorazoo.AdapterSpec(rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets),
                          name=f"a{i}")
        with torch.no_grad():
            for p in h.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ours.eval()
    ways = {"base": lambda: base(input_ids=batch).logits}
    ways["lorazoo mixed_batch"] = lambda: _mixed(ours, names, batch, mixed_batch)
    lorazoo.activate(ours, "a0")
    ways["lorazoo one adapter"] = lambda: ours(input_ids=batch).logits
    peft_model = _peft_copy(base, ours, adapters, cfg)
    if peft_model is not None:
        ways["peft adapter_names"] = lambda: peft_model(input_ids=batch, adapter_names=names).logits
    with torch.no_grad():
        ref = ways["lorazoo mixed_batch"]()
        if peft_model is not None:
            diff = (ways["peft adapter_names"]() - ref).abs().max().item()
            log(f"lorazoo mixed_batch vs PEFT adapter_names: max |diff| {diff:.2e}")
            if diff > 1e-3:
                raise RuntimeError(f"lorazoo and PEFT disagree by {diff:.2e}: not the same computation")
        samples = {k: [] for k in ways}
        for rnd in range(cfg.warmup + cfg.rounds):
            order = list(ways)[rnd % len(ways):] + list(ways)[:rnd % len(ways)]
            for k in order:
                t = timed(ways[k])
                if rnd >= cfg.warmup:
                    samples[k].append(t)
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [{"way": k, "forward ms": 1000 * med[k], "samples/s": cfg.batch / med[k],
             "×base time": med[k] / med["base"],
             "throughput ×PEFT": (med["peft adapter_names"] / med[k]) if "peft adapter_names" in med else None}
            for k in ways]
    return {"config": {**cfg.__dict__, "adapters": adapters}, "rows": rows}


def _mixed(model, names, batch, mixed_batch):
    with mixed_batch(model, names):
        return model(input_ids=batch).logits


def _peft_copy(base, ours, adapters, cfg):
    """The same adapters in PEFT (None when peft is not installed)."""
    try:
        import peft
    except ImportError:
        return None
    import lorazoo

    pm = None
    for i in range(adapters):
        conf = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=0.0)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), conf, adapter_name=f"a{i}")
        else:
            pm.add_adapter(f"a{i}", conf)
        h = lorazoo.handles_of(ours)[f"a{i}"]
        with torch.no_grad():
            for path, ad in h.adapters().items():
                mod = pm.base_model.model.get_submodule(path)
                mod.lora_A[f"a{i}"].weight.copy_(ad.form.A)
                mod.lora_B[f"a{i}"].weight.copy_(ad.form.B)
    return pm.eval()


def write_mixed(results: dict | list[dict], out) -> Path:
    """mixed.md and mixed.json: one row group per run (a sweep over tokens per sample)."""
    results = [results] if isinstance(results, dict) else list(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = results[0]["config"]
    seqs = ", ".join(str(r["config"]["seq"]) for r in results)
    lines = [f"# lorazoo bench --mixed {c['adapters']}", "",
             f"{c['adapters']} LoRA adapters (r={c['rank']}) on a random-init Llama (hidden {c['hidden']}, "
             f"{c['layers']} layers), one adapter per sample over a batch of {c['batch']} samples of {seqs} tokens; "
             f"inference forward, median of {c['rounds']} interleaved rounds, {c['threads']} threads.", "",
             "| tokens | way | forward ms | samples/s | ×base time | throughput ×PEFT |", "|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            x = "–" if r["throughput ×PEFT"] is None else f"{r['throughput ×PEFT']:.2f}"
            lines.append(f"| {res['config']['seq']} | {r['way']} | {r['forward ms']:.1f} | {r['samples/s']:.1f} | "
                         f"{r['×base time']:.2f} | {x} |")
    (out / "mixed.md").write_text("\n".join(lines) + "\n")
    (out / "mixed.json").write_text(json.dumps(results if len(results) > 1 else results[0], indent=1))
    return out / "mixed.md"
