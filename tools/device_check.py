"""Every preset on an accelerator against the same adapter in float64 on the CPU: one script for a session
that is lent a GPU (run it there with the machine's own torch: ``PYTHONPATH=src python3 tools/device_check.py``).

For each preset whose parts exist, on a small random Llama: the adapter is built on the CPU, its trainable
tensors moved off their init, and the model copied to ``--device`` in float32 (TF32 off). One training
forward (in eval mode: no dropout, noise or sampling) and backward on both; the script compares the logits
and every trainable gradient (relative Frobenius error), then a bf16 autocast training step on the device (finite loss and gradients), then merge and
unmerge on the device for mergeable forms. Prints one line a preset and a summary; exits 1 if any
preset fails. ``--device cpu`` runs the same comparison on this machine (float32 against float64), which
is how the script itself is tested. About a second a preset on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import lorazoo
from lorazoo.errors import LorazooError
from lorazoo.presets import PRESETS
from lorazoo.study.bench_runner import give_labels

TOL = 1e-4  # relative error of float32 (TF32 off) against float64 on this model


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(cfg).double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step(model, handle, ids, autocast=None):
    """Forward and backward; in eval mode for the exact comparison (no dropout, gate noise or sampling, which
    draw different numbers in float32 and float64), in training mode under autocast."""
    model.train(autocast is not None)
    give_labels(handle, ids.shape[0])
    for p in handle.trainable_parameters():
        p.grad = None
    with torch.autocast(ids.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(input_ids=ids, labels=ids)
    (out.loss + handle.aux_loss()).backward()
    return out.logits.float(), {n: p.grad for n, p in handle.named_trainable_parameters()}


def check(name: str, device: str) -> tuple[str, str]:
    try:
        spec = lorazoo.AdapterSpec.preset(name, targets="all-linear")
    except LorazooError as e:
        return "skip", str(e).splitlines()[0][:80]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_model = llama()
    try:
        h = lorazoo.adapt(ref_model, spec, calibration=[{"input_ids": ids, "labels": ids}])
    except LorazooError as e:
        return "skip", str(e).splitlines()[0][:80]
    h.plan(100)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in h.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    model = copy.deepcopy(ref_model).float().to(device)
    dev = lorazoo.handles_of(model)["default"]
    torch.manual_seed(5)
    want_logits, want = step(ref_model, h, ids)
    torch.manual_seed(5)
    got_logits, got = step(model, dev, ids.to(device))
    errors = {"logits": rel(got_logits, want_logits)}
    scale = max((float(v.norm()) for v in want.values() if v is not None), default=0.0)
    # a gradient that is zero in exact arithmetic (an unused router in eval mode) is rounding noise in both
    errors.update({k: rel(got[k], want[k]) for k in want if want[k] is not None and want[k].norm() > 1e-6 * scale})
    worst = max(errors, key=errors.get)
    if errors[worst] > TOL:
        return "FAIL", f"{worst} relative error {errors[worst]:.1e} (> {TOL:g})"
    logits, grads = step(model, dev, ids.to(device), autocast=torch.bfloat16)  # finite, not exact
    bad = [k for k, v in grads.items() if v is not None and not torch.isfinite(v).all()]
    if not torch.isfinite(logits).all() or bad:
        return "FAIL", f"bf16 autocast step not finite ({', '.join(bad[:3]) or 'logits'})"
    merged = ""
    if all(ad.form.mergeable for ad in dev.adapters().values()) and spec.part_classes()["form"].adapts_layers:
        model.eval()
        with torch.no_grad():
            before = model(input_ids=ids.to(device)).logits
            dev.merge()
            after = model(input_ids=ids.to(device)).logits
            dev.unmerge()
            back = model(input_ids=ids.to(device)).logits
        merged = f", merge {rel(after, before):.0e}, unmerge {rel(back, before):.0e}"
        if rel(after, before) > 10 * TOL or rel(back, before) > 10 * TOL:
            return "FAIL", "merged or unmerged model differs" + merged
    return "ok", f"worst {worst} {errors[worst]:.1e}{merged}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", help="comma-separated (default: all)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    names = args.presets.split(",") if args.presets else sorted(PRESETS)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({where}), torch {torch.__version__}, {len(names)} presets")
    t0, counts = time.perf_counter(), {}
    for name in names:
        try:
            status, text = check(name, args.device)
        except Exception as e:  # noqa: BLE001 - one broken preset must not hide the others
            status, text = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        counts[status] = counts.get(status, 0) + 1
        print(f"{status:4} {name:<16} {text}", flush=True)
    print(f"{counts} in {time.perf_counter() - t0:.0f} s")
    return 1 if counts.get("FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())
