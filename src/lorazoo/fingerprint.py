"""A fingerprint of the base weights an adapter was made for, tolerant to float rounding."""
from __future__ import annotations

import hashlib
import json
import math

import torch


@torch.no_grad()
def weight_stats(weight: torch.Tensor) -> list[float]:
    w = weight.detach().double()
    flat = w.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 257)][:257]
    return [float(w.norm()), float(w.sum()), float((sample * torch.arange(1, len(sample) + 1, dtype=w.dtype)).sum())]


def fingerprint(weights: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per layer: shape and three statistics of the frozen weight (out, in)."""
    return {p: [list(w.shape), weight_stats(w)] for p, w in sorted(weights.items())}


def short(fp: dict) -> str:
    shapes = json.dumps({p: v[0] for p, v in fp.items()}, sort_keys=True)
    return hashlib.sha256(shapes.encode()).hexdigest()[:12]


def mismatches(saved: dict, current: dict, rtol: float = 1e-4, quant_error: float = 0.0) -> list[str]:
    """Layers whose shape or statistics differ; empty when the base is the same.

    ``quant_error`` q > 0 (lorazoo.qbase.RELATIVE_ERROR) compares a base with its quantized version:
    a quantization error E with ‖E‖ <= q·‖W‖ moves the norm by at most q·‖W‖, and, its entries being
    zero-mean and nearly independent, the sum by about q·‖W‖ and the weighted sample sum by about
    q·rms(W)·sqrt(Σk²): each is allowed 4 such standard deviations. A differently initialized model
    moves the two sums by ~sqrt(2)/q times as much, so it is still refused (on two layers almost surely).
    """
    bad = [p for p in saved if p not in current]
    for p, (shape, stats) in saved.items():
        if p not in current:
            continue
        cshape, cstats = current[p]
        scale = max(abs(stats[0]), 1e-12)
        tols = [rtol * scale] * 3
        if quant_error > 0:
            n = max(1, math.prod(shape))
            k = len(range(0, n, max(1, n // 257))[:257])
            rms = scale / math.sqrt(n)
            tols = [max(t, q) for t, q in zip(tols, [
                quant_error * scale, 4 * quant_error * scale,
                4 * quant_error * rms * math.sqrt(k * (k + 1) * (2 * k + 1) / 6)])]
        if list(shape) != list(cshape) or any(
            not math.isclose(a, b, rel_tol=rtol, abs_tol=t) for a, b, t in zip(stats, cstats, tols)
        ):
            bad.append(p)
    return bad
