"""``lorazoo bench --quant``: what a quantized base (QLoRA) saves and costs, on SmolLM2-135M.

Two measurements, each precision of the base in its own fresh process (peak RSS is per process;
the mechanism of :mod:`.bench_mem`):

- **the base**: its weight bytes as stored (parameters, buffers and quantization constants:
  :func:`lorazoo.quantize.model_bytes`), split into the quantized linear layers and the rest
  (embeddings, the tied lm_head, norms: never quantized), and the process RSS the loaded model
  adds to a process that has imported everything (VmRSS after load minus VmRSS before; freed
  pages handed back with ``malloc_trim`` first), with the peak RSS while loading;
- **a LoRA training step** (r = ``cfg.rank`` on the nlg task's targets, AdamW, the bench's step):
  its peak RSS over the loaded base and the bytes autograd saves, in the same child; and, in this
  process, its median time with every precision's model built once and timed in interleaved,
  rotated rounds (:func:`.bench.interleaved`), ratios to fp32.

Precisions: ``fp32``, ``bf16`` (loaded as such), ``nf4`` (bitsandbytes ``Linear4bit`` NF4 with
double quantization, QLoRA's setting, quantized from the fp32 model: compute and the unquantized
rest in fp32), ``nf4-bf16`` (the same from the bf16 model: QLoRA's usual bf16 compute and rest),
``nf4-nodq`` (no double quantization), ``torchao-nf4`` (torchao's NF4Tensor, scales in blocks of
256) and ``int8`` (bitsandbytes LLM.int8 rows). A layer a backend refuses here
(:func:`lorazoo.qbase.unsupported`) stays in full precision and is listed: torchao refuses
SmolLM2's attention projections (576·576 and 576·192 weights give 5184 and 1728 block scales, not a
multiple of its scaler block 256), so its row quantizes the MLP only.

NF4 stores 4 bits per weight plus one absmax per block of 64: a float32 (32/64 = 0.5 bit per
weight) or, double-quantized, a uint8 (0.125 bit) plus a float32 per 256 such bytes and a 256-entry
code per layer, about 4.127 bits: 0.258x bf16's 16 bits, 0.129x fp32 (:func:`nf4_bits`).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import LorazooError
from ..memory import MB, saved_for_backward_mb
from .bench_mem import proc_status, reset_peak
from .bench_runner import BenchConfig, Method, build_base, lorazoo_runner, make_batch, timed

PRECISIONS: dict[str, dict] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "float32", "quant": "nf4", "backend": "bitsandbytes", "double_quant": True},
    "nf4-bf16": {"dtype": "bfloat16", "quant": "nf4", "backend": "bitsandbytes", "double_quant": True},
    "nf4-nodq": {"dtype": "float32", "quant": "nf4", "backend": "bitsandbytes", "double_quant": False},
    "torchao-nf4": {"dtype": "float32", "quant": "nf4", "backend": "torchao"},
    "int8": {"dtype": "float32", "quant": "int8", "backend": "bitsandbytes"},
}
TRAIN = ("fp32", "bf16", "nf4", "nf4-bf16")  # the precisions whose LoRA step is timed
SMOLLM2 = {"model": "smollm2"}


def random_source(cfg: BenchConfig) -> dict:
    """A model source for the bench's random-init Llama of ``cfg`` (tests; no download)."""
    return {"model": "random", "config": asdict(cfg)}


def nf4_bits(double_quant: bool, block: int = 64, block2: int = 256) -> float:
    """Bits per weight of bitsandbytes' NF4 on a large layer: 4-bit codes and the block constants."""
    return 4 + (8 / block + 32 / (block * block2) if double_quant else 32 / block)


# --- building a base in one precision -----------------------------------------------------------
def smollm2_folder() -> str:
    """The nlg task's SmolLM2-135M folder (float32 safetensors), or a clear error where it is missing."""
    from ..tasks.nlg import model_folder

    try:
        return model_folder()
    except LorazooError as e:
        raise LorazooError(f"lorazoo bench --quant measures SmolLM2-135M, the nlg_sentiment task's model, which "
                           f"is not here: {e}") from None


def load_base(source: dict, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    """(model in train mode, its adapter targets) for ``source``: SmolLM2-135M (the nlg task's
    model and targets) or the bench's random Llama."""
    if source["model"] == "random":
        cfg = BenchConfig(**source["config"])
        return build_base(cfg).to(dtype), list(cfg.targets)
    if source["model"] != "smollm2":
        raise LorazooError(f"unknown model source {source['model']!r}")
    from transformers import AutoModelForCausalLM

    from ..tasks._util import quiet_transformers
    from ..tasks.nlg import NLGSentimentTask

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=dtype)
    return model.train(), list(NLGSentimentTask.targets)


def quantize_base(model: nn.Module, prec: dict) -> dict[str, str]:
    """Quantize ``model`` in place as ``prec`` says; layers the backend refuses here stay in full
    precision: returns {layer name: why} for them (one entry per layer name, e.g. 'q_proj')."""
    from .. import qbase
    from ..quantize import quantize
    from ..targets import HEAD_NAMES, _output_head_ids

    left: dict[str, str] = {}
    heads = _output_head_ids(model)
    for path, mod in model.named_modules():
        if type(mod) is nn.Linear and id(mod) not in heads and path.split(".")[-1] not in HEAD_NAMES:
            why = qbase.unsupported(prec["backend"], prec["quant"], mod.weight)
            if why:
                left.setdefault(path.split(".")[-1], why)
    quantize(model, prec["quant"], prec["backend"], double_quant=prec.get("double_quant", False),
             skip=(*HEAD_NAMES, *left))
    return left


def build(source: dict, precision: str) -> tuple[nn.Module, list[str], dict[str, str]]:
    """(model, targets, layers left unquantized) for one precision of PRECISIONS."""
    prec = PRECISIONS[precision]
    model, targets = load_base(source, getattr(torch, prec["dtype"]))
    left = quantize_base(model, prec) if "quant" in prec else {}
    _own_memory(model)
    model.requires_grad_(False)
    return model, targets, left


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Give every plain tensor its own memory: transformers maps float32 weights from the safetensors file
    in place, and one tensor left on that mapping (the embeddings of a quantized model) keeps every page
    that quantization read resident, the linears' float32 weights included (measured on SmolLM2: NF4's
    RSS 650 MB with the mapping, for 161 MB of weights)."""
    from .. import qbase

    quantized = {id(t) for m in model.modules() if qbase.is_quantized(m) for t in m.parameters(recurse=False)}
    for mod in model.modules():
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if id(t) not in quantized and type(t.data) is torch.Tensor and not qbase._is_nf4_tensor(t):
                t.data = t.data.clone()


def weight_bytes(model: nn.Module, targets: list[str]) -> dict:
    """Bytes as stored: the whole model (model_bytes), the target linear layers' weights (quantized
    or not: codes and constants), and the rest (embeddings, lm_head, norms, any layer left out)."""
    from .. import qbase
    from ..quantize import model_bytes

    total = model_bytes(model)
    lin = [m for p, m in model.named_modules() if p.split(".")[-1] in targets and hasattr(m, "weight")]
    quant = [m for m in lin if qbase.is_quantized(m)]
    lin_bytes = sum(qbase.stored_bytes(m) for m in lin)
    lin_params = sum(m.in_features * m.out_features for m in lin)
    # bitsandbytes packs two 4-bit codes a byte, so its parameters count half the weights: count by shape
    params = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] not in targets) + lin_params
    return {"total_bytes": total, "linear_bytes": lin_bytes, "rest_bytes": total - lin_bytes,
            "params": params, "linear_params": lin_params, "linear_layers": len(lin), "quantized_layers": len(quant)}


# --- one precision in a fresh process -----------------------------------------------------------
def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the kernel (glibc), so RSS shows what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _touch(model: nn.Module) -> None:
    """Read one value of every page of the model's plain tensors: transformers may leave float32 weights
    mapped from the safetensors file, resident only once read, and a model in use reads them all."""
    from .. import qbase

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            d = t.data
            if type(d) is torch.Tensor and not qbase._is_nf4_tensor(t) and d.numel():
                d.reshape(-1)[:: max(1, 4096 // d.element_size())].float().sum()


def _import_all() -> None:
    """Import what any precision needs before the first reading, so imports are never counted."""
    import transformers  # noqa: F401

    from .. import adapt, qbase  # noqa: F401

    qbase.available("bitsandbytes")  # imports it where installed


def measure_one(source: dict, precision: str, cfg: BenchConfig, train: bool) -> dict:
    """The base's bytes and RSS after load; with ``train``, LoRA's peak RSS over the loaded base."""
    torch.set_num_threads(cfg.threads)
    _import_all()
    if PRECISIONS[precision].get("backend") == "torchao":
        from ..qbase import torchao_to_nf4

        torchao_to_nf4()
    _trim()
    was_reset = reset_peak()
    rss0, file0 = proc_status("VmRSS"), proc_status("RssFile")
    model, targets, left = build(source, precision)
    _touch(model)
    _trim()
    rss1, hwm1, file1 = proc_status("VmRSS"), proc_status("VmHWM"), proc_status("RssFile")
    out = {"precision": precision, **weight_bytes(model, targets), "left_unquantized": left,
           "rss_before_mb": rss0 / MB, "load_rss_mb": (rss1 - rss0) / MB, "load_file_mb": (file1 - file0) / MB,
           "load_peak_mb": (hwm1 - rss0) / MB, "peak_reset": was_reset}
    if train:
        c = _cfg_for(cfg, model)
        batch = make_batch(c)
        reset_peak()
        base = proc_status("VmRSS")
        runner = lorazoo_runner(_method(precision, c, targets), c, model, batch)
        out["saved_mb"] = saved_for_backward_mb(model, runner.step)
        for _ in range(cfg.mem_steps - 1):
            runner.step()
        peak = proc_status("VmHWM")
        out.update(train_peak_mb=(peak - rss0) / MB, train_overhead_mb=(peak - base) / MB,
                   trainable=runner.trainable)
    return out


def _cfg_for(cfg: BenchConfig, model: nn.Module) -> BenchConfig:
    """The bench config with the model's vocabulary (the random batch's token range)."""
    return BenchConfig(**{**asdict(cfg), "vocab": model.config.vocab_size})


def _method(precision: str, cfg: BenchConfig, targets: list[str]) -> Method:
    from ..spec import AdapterSpec

    spec = AdapterSpec.preset("lora", rank=cfg.rank, alpha=cfg.alpha, targets=targets)
    return Method(precision, "lorazoo", spec.to_dict())


def in_child(source: dict, precision: str, cfg: BenchConfig, train: bool) -> dict:
    """:func:`measure_one` in a fresh ``python -m lorazoo.study.bench_quant`` process."""
    job = json.dumps({"source": source, "precision": precision, "config": asdict(cfg), "train": train})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(cfg.threads)}
    p = subprocess.run([sys.executable, "-m", "lorazoo.study.bench_quant", job], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise LorazooError(f"quant measurement of {precision} failed:\n{p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    job = json.loads((argv if argv is not None else sys.argv[1:])[0])
    print(json.dumps(measure_one(job["source"], job["precision"], BenchConfig(**job["config"]), job["train"])))
    return 0


# --- the whole run ------------------------------------------------------------------------------
def time_steps(source: dict, precisions: list[str], cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    """Median LoRA step time per precision, every model built once here, interleaved rounds."""
    from .bench import interleaved, summary

    runners = []
    for prec in precisions:
        model, targets, _ = build(source, prec)
        c = _cfg_for(cfg, model)
        runners.append(lorazoo_runner(_method(prec, c, targets), c, model, make_batch(c)))
        log(f"built   {prec:<12} trainable {runners[-1].trainable:,}")
    log(f"timing LoRA steps: {len(runners)} precisions x ({cfg.warmup} warm-up + {cfg.rounds}) rounds")
    samples = interleaved(runners, lambda r: {"step": timed(r.step)}, cfg.rounds, cfg.warmup)
    out = {}
    for r in runners:
        xs = samples[r.method.key]["step"]
        med, spread = summary(xs)
        out[r.method.label] = {"step_s": med, "step_spread": spread, "step_samples": xs, "trainable": r.trainable}
    return out


def run_quant(cfg: BenchConfig, source: dict = SMOLLM2, precisions=tuple(PRECISIONS), train=TRAIN,
              memory: bool = True, jobs: int = 1, fresh: bool = True,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Every precision's base bytes and load RSS, LoRA's peak RSS (``train`` precisions), each in a
    fresh process (``fresh=False``: in this one, for tests; RSS then means little), and the LoRA
    step times of ``train`` interleaved in this process; with ratios to fp32 and bf16."""
    from .bench import environment

    precisions = list(precisions)
    train = [p for p in precisions if p in train]
    for p in precisions:
        if p not in PRECISIONS:
            raise LorazooError(f"unknown precision {p!r}; known: {', '.join(PRECISIONS)}")
    if source["model"] == "smollm2":
        smollm2_folder()  # its clear error before any child starts
    load_before = os.getloadavg()
    rows: dict[str, dict] = {}
    if memory:
        one = in_child if fresh else measure_one

        def go(p):
            res = one(source, p, cfg, p in train)
            log(f"memory  {p:<12} weights {res['total_bytes'] / MB:7.1f} MB, load RSS {res['load_rss_mb']:7.1f} MB"
                + (f", LoRA peak {res['train_peak_mb']:7.1f} MB" if "train_peak_mb" in res else ""))
            return res

        with ThreadPoolExecutor(max_workers=max(1, jobs if fresh else 1)) as pool:
            rows = dict(zip(precisions, pool.map(go, precisions)))
    else:
        for p in precisions:
            model, targets, left = build(source, p)
            rows[p] = {"precision": p, **weight_bytes(model, targets), "left_unquantized": left}
            del model
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        steps = time_steps(source, train, cfg, log) if train else {}
    finally:
        torch.set_num_threads(threads)
    for p, t in steps.items():
        rows[p].update(t)
    add_quant_ratios(rows)
    env = environment(cfg)
    env["loadavg_before"], env["loadavg_after"] = load_before, os.getloadavg()
    for lib in ("bitsandbytes", "torchao"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            env[lib] = None
    return {"config": asdict(cfg), "source": source, "environment": env, "memory": memory, "fresh": fresh,
            "rows": list(rows.values()), "nf4_bits": {"double_quant": nf4_bits(True), "plain": nf4_bits(False)}}


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def add_quant_ratios(rows: dict[str, dict]) -> None:
    """Each row's bytes, RSS and step time over fp32's and bf16's (where those rows exist)."""
    for r in rows.values():
        r["bits_per_linear_weight"] = 8 * r["linear_bytes"] / r["linear_params"]
        r["rest_share"] = r["rest_bytes"] / r["total_bytes"]
        for ref in ("fp32", "bf16"):
            o = rows.get(ref, {})
            for q, stem in (("total_bytes", "bytes"), ("linear_bytes", "linear"), ("load_rss_mb", "rss"),
                            ("step_s", "step"), ("train_peak_mb", "train_peak"), ("train_overhead_mb", "train_mem")):
                r[f"{stem}_vs_{ref}"] = _ratio(r.get(q), o.get(q))


# --- the report ---------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    c, e = result["config"], result["environment"]
    rows = {r["precision"]: r for r in result["rows"]}
    name = "SmolLM2-135M" if result["source"]["model"] == "smollm2" else "a random-init Llama"
    any_row = next(iter(rows.values()))
    lines = ["# lorazoo bench --quant", "",
             f"{name} ({any_row['params'] / 1e6:.1f} M weights, of which {any_row['linear_params'] / 1e6:.1f} M in "
             f"{any_row['linear_layers']} linear layers that quantization replaces; embeddings, the lm_head and "
             f"the norms stay in the model's dtype), on CPU: torch {e['torch']}, transformers {e['transformers']}, "
             f"bitsandbytes {e.get('bitsandbytes')}, torchao {e.get('torchao')}; {c['threads']} threads "
             f"({e['cpus']} CPUs). Load average before/after: {e['loadavg_before'][0]:.2f} / "
             f"{e['loadavg_after'][0]:.2f}.", "",
             "## The base", "",
             *([] if result.get("fresh", True) or not result["memory"] else
               ["Measured in the calling process (fresh=False, for tests): the RSS columns mean little.", ""]),
             "weights: parameters, buffers and quantization constants as stored (`model_bytes`); linears: the "
             "quantized layers' codes and constants (bits per weight); rest: what is never quantized. "
             + ("load RSS: what the loaded model adds to the RSS of a process that imported everything (fresh "
                "process per precision, every weight read once, freed heap trimmed); file-mapped: the part of it "
                "that is the safetensors file mapped in place (float32 loaded as float32); load peak: the most RSS "
                "while loading and quantizing (the quantized rows load the full-precision model first)."
                if result["memory"] else
                "RSS not measured (--no-memory)."), "",
             "| precision | weights MB | ×fp32 | ×bf16 | linears MB | bits/weight | rest MB | rest share | "
             "load RSS MB | of it file-mapped | RSS ×bf16 | load peak MB | left in full precision |",
             "|" + "---|" * 13]
    for p, r in rows.items():
        left = ", ".join(r.get("left_unquantized") or {}) or "–"
        lines.append(f"| {p} | {r['total_bytes'] / MB:.1f} | {_f(r.get('bytes_vs_fp32'), '{:.3f}')} | "
                     f"{_f(r.get('bytes_vs_bf16'), '{:.3f}')} | {r['linear_bytes'] / MB:.1f} | "
                     f"{r['bits_per_linear_weight']:.3f} | {r['rest_bytes'] / MB:.1f} | {r['rest_share']:.0%} | "
                     f"{_f(r.get('load_rss_mb'))} | {_f(r.get('load_file_mb'))} | "
                     f"{_f(r.get('rss_vs_bf16'), '{:.2f}')} | "
                     f"{_f(r.get('load_peak_mb'))} | {left} |")
    nf4, bf16 = rows.get("nf4-bf16"), rows.get("bf16")
    if nf4 and bf16:
        b = result["nf4_bits"]
        lines += ["", f"NF4 / bf16 weight bytes: **{nf4['bytes_vs_bf16']:.3f}** for the whole model (nf4-bf16 row), "
                  f"**{nf4['linear_vs_bf16']:.3f}** for the quantized linears alone. The linears: 4-bit codes "
                  f"plus one absmax per block of 64 weights, double-quantized to a uint8 with a float32 per 256 "
                  f"blocks: {b['double_quant']:.3f} bits per weight expected, {b['double_quant'] / 16:.3f}x "
                  f"bf16 (without double quantization a float32 absmax: {b['plain']:.2f} bits, "
                  f"{b['plain'] / 16:.3f}x); measured {nf4['bits_per_linear_weight']:.3f}. The whole model "
                  f"is not 4x smaller because {1 - nf4['linear_params'] / nf4['params']:.0%} of its weights "
                  f"(the {(nf4['params'] - nf4['linear_params']) / 1e6:.1f} M of the embeddings, the lm_head "
                  f"(tied to them in SmolLM2) and the norms) stay in bf16: {nf4['rest_bytes'] / MB:.1f} MB, "
                  f"{nf4['rest_share']:.0%} of the NF4 model's bytes."]
        if "nf4" in rows:
            lines.append(f"Quantized from the fp32 model (nf4 row) that rest stays fp32: "
                         f"{rows['nf4']['rest_bytes'] / MB:.1f} MB, NF4 / bf16 = {rows['nf4']['bytes_vs_bf16']:.3f}.")
    timed_rows = [r for r in rows.values() if r.get("step_s") is not None]
    if timed_rows:
        lines += ["", "## LoRA training step", "",
                  f"LoRA r={c['rank']} (alpha {c['alpha']:g}) on the linears above, AdamW; random tokens, batch "
                  f"{c['batch']} x {c['seq']}; median of {c['rounds']} rounds after {c['warmup']} warm-up, "
                  f"precisions interleaved, order rotated (± IQR: interquartile range over the median)."
                  + (f" peak RSS (fresh process per precision): the most RSS of the process during "
                     f"{c['mem_steps']} steps over its RSS before loading (base + adapter + optimizer + "
                     f"activations); overhead: over the loaded base; saved: the bytes autograd keeps for "
                     f"backward in one step (parameters excluded)." if result["memory"] else
                     " Memory not measured (--no-memory)."), "",
                  "| precision | trainable | step ms | ± IQR | step ×fp32 | peak RSS MB | peak ×fp32 | "
                  "overhead MB | saved MB |", "|" + "---|" * 9]
        for r in timed_rows:
            lines.append(f"| {r['precision']} | {_f(r.get('trainable'), '{:,}')} | {r['step_s'] * 1000:.0f} | "
                         f"{r['step_spread']:.0%} | {_f(r.get('step_vs_fp32'), '{:.2f}')} | "
                         f"{_f(r.get('train_peak_mb'))} | {_f(r.get('train_peak_vs_fp32'), '{:.2f}')} | "
                         f"{_f(r.get('train_overhead_mb'))} | {_f(r.get('saved_mb'))} |")
    return "\n".join(lines) + "\n"


def write_quant(result: dict, out) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.md").write_text(markdown(result))
    (out / "quant.json").write_text(json.dumps(result, indent=1))
    return out / "quant.md"


if __name__ == "__main__":
    sys.exit(main())
