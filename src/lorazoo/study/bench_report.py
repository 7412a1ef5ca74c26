"""The benchmark's result as Markdown, JSON and a PNG chart (``bench.md``, ``bench.json``, ``bench.png``)."""
from __future__ import annotations

import json
from pathlib import Path

from .bench import REFERENCE

COLUMNS = (  # header, row key, format
    ("method", "variant", "{}"), ("impl", "impl", "{}"), ("trainable", "trainable", "{:,}"),
    ("step ms", "step_s", "ms"), ("± IQR", "step_spread", "{:.0%}"),
    ("step ×LoRA", "step_vs_lora", "{:.2f}"), ("step ×floor", "step_vs_floor", "{:.2f}"),
    ("mem MB", "overhead_mb", "{:.0f}"), ("mem ×LoRA", "mem_vs_lora", "{:.2f}"),
    ("mem ×floor", "mem_vs_floor", "{:.2f}"), ("saved MB", "saved_mb", "{:.0f}"),
    ("saved ×LoRA", "saved_vs_lora", "{:.2f}"),
    ("fwd ms", "fwd_s", "ms"), ("fwd ×base", "fwd_vs_base", "{:.2f}"),
    ("merged fwd ms", "fwd_merged_s", "ms"), ("merged ×base", "merged_fwd_vs_base", "{:.2f}"),
)
SIDE = (  # lorazoo vs PEFT: header, row key, which implementation's row
    ("step ×LoRA lorazoo", "step_vs_own_lora", "lorazoo"), ("step ×LoRA PEFT", "step_vs_own_lora", "peft"),
    ("mem ×LoRA lorazoo", "mem_vs_own_lora", "lorazoo"), ("mem ×LoRA PEFT", "mem_vs_own_lora", "peft"),
    ("saved ×LoRA lorazoo", "saved_vs_own_lora", "lorazoo"), ("saved ×LoRA PEFT", "saved_vs_own_lora", "peft"),
)


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "–"
    if fmt == "ms":
        return f"{value * 1000:.1f}"
    return fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _pairs(result: dict) -> dict[str, dict[str, dict]]:
    """{variant: {impl: row}} for the adapter rows (the floor left out)."""
    out: dict[str, dict[str, dict]] = {}
    for r in result["rows"]:
        if r["impl"] != "floor":
            out.setdefault(r["variant"], {})[r["impl"]] = r
    return out


def _setup_line(result: dict) -> str:
    c, e = result["config"], result["environment"]
    peft = f", peft {e['peft']}" if e.get("peft") else ""
    device = c.get("device", "cpu")
    where = (f"{c['threads']} threads ({e['cpus']} CPUs)" if device == "cpu"
             else f"on {device} ({e.get('gpu') or 'GPU'})")
    return (f"Random-init Llama: hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} layers, "
            f"{c['heads']} heads, vocab {c['vocab']}, fp32; batch {c['batch']} x {c['seq']}; adapters on "
            f"{', '.join(c['targets'])}, r={c['rank']}, alpha={c['alpha']:g}; {where}; median of {c['rounds']} rounds after {c['warmup']} warm-up, methods "
            f"interleaved, order rotated. torch {e['torch']}, transformers {e['transformers']}{peft}. "
            f"Load average before/after: {e['loadavg_before'][0]:.2f} / {e['loadavg_after'][0]:.2f}.")


def markdown(result: dict) -> str:
    """The report: setup, every row, lorazoo vs PEFT side by side, and what was skipped."""
    lines = ["# lorazoo bench", "", _setup_line(result), "",
             "×LoRA: ratio to lorazoo's LoRA. ×floor: ratio to the floor (frozen base, gradients to the "
             "inputs only; its forward is the base model's). mem: peak RSS overhead over the built base "
             "model (VmHWM - VmRSS; on a GPU the device's peak allocation over the base's), fresh process per "
             "method; on a CPU it moves by ±15 MB between runs with the allocator. "
             "saved: the bytes autograd keeps for backward in one step, parameters excluded (exact, "
             "repeatable). ± IQR: interquartile range of the step "
             "time over the median (noise).", ""]
    lines += _table([h for h, _, _ in COLUMNS],
                    [[_fmt(r.get(k), f) for _, k, f in COLUMNS] for r in result["rows"]])
    pairs = {v: p for v, p in _pairs(result).items() if "peft" in p}
    if pairs:
        lines += ["", "## lorazoo vs PEFT", "",
                  "Each implementation against its own LoRA; the last columns compare the two directly.", ""]
        header = ["method", *(h for h, _, _ in SIDE), "step PEFT / lorazoo", "mem PEFT / lorazoo",
                  "saved PEFT / lorazoo"]
        body = []
        for v, p in pairs.items():
            cells = [v, *(_fmt(p[impl].get(k), "{:.2f}") for _, k, impl in SIDE)]
            for q in ("step_s", "overhead_mb", "saved_mb"):
                a, b = p["peft"].get(q), p["lorazoo"].get(q)
                cells.append(_fmt(a / b if a is not None and b else None, "{:.2f}"))
            body.append(cells)
        lines += _table(header, body)
    compiled = [r for r in result["rows"] if r.get("step_vs_eager") is not None]
    if compiled:
        lines += ["", "## torch.compile vs eager", "",
                  f"Each method compiled (backend {compiled[0].get('backend', '?')}; compiled before timing, "
                  f"compile time and graph breaks given; 0 breaks: each forward is one graph) against the same "
                  f"method eager.", ""]
        lines += _table(["method", "step ms eager", "step ms compiled", "step compiled / eager",
                         "fwd compiled / eager", "compile s", "graph breaks"],
                        [[r["variant"], _fmt(r["step_s"] / r["step_vs_eager"], "ms"), _fmt(r["step_s"], "ms"),
                          _fmt(r["step_vs_eager"], "{:.2f}"), _fmt(r.get("fwd_vs_eager"), "{:.2f}"),
                          _fmt(r.get("compile_s"), "{:.1f}"), _fmt(r.get("graph_breaks"), "{}")] for r in compiled])
    if result.get("skipped"):
        lines += ["", "## Not run", ""] + [f"- `{k}`: {why}" for k, why in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """Bars of step-time and memory-overhead ratios to lorazoo's LoRA, lorazoo and PEFT side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(result)
    names = list(pairs)
    impls = [i for i in ("lorazoo", "peft") if any(i in p for p in pairs.values())]
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(names) + 2), 7), sharex=True)
    for ax, key, title in ((axes[0], "step_vs_lora", "training-step time"),
                           (axes[1], "mem_vs_lora", "peak-memory overhead")):
        for j, impl in enumerate(impls):
            vals = [pairs[n].get(impl, {}).get(key) for n in names]
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=impl)
        floor = next(r for r in result["rows"] if r["impl"] == "floor").get(key)
        ax.axhline(1.0, color="k", lw=0.8)
        if floor is not None:
            ax.axhline(floor, color="grey", ls=":", lw=1, label="floor")
        ax.set_ylabel(f"× lorazoo {REFERENCE}")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[1].set_xticks(range(len(names)), names, rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: str | Path) -> dict[str, Path]:
    """Write bench.md, bench.json and bench.png into the folder ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "bench.md", "json": out / "bench.json", "png": out / "bench.png"}
    paths["md"].write_text(markdown(result))
    paths["json"].write_text(json.dumps(result, indent=1))
    try:
        chart(result, paths["png"])
    except ImportError:
        del paths["png"]  # the caller says so; the chart needs the 'study' extra
    return paths
