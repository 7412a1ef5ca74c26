"""The papers' findings about learned weights, judged on the adapters a suite's trials keep.

``keep_adapter: true`` trials (suites ``lora_paper`` and ``lorma``) leave their saved run in
``<db>.adapters/<trial>``; these checks load them (:func:`lorazoo.analysis.load_run`) and run
:mod:`lorazoo.analysis` on them, so `lorazoo report` gives these findings a verdict like the others.
Each uses the adapters of a variant's best learning rate (highest mean metric over the kept
trials), one value per seed (the mean over the adapted layers; the papers look at one layer),
and the statistics of :mod:`.verdicts` (a difference counts beyond ``Z`` standard errors).

- ``subspace`` (LoRA Eq. 4, Figs. 3-4): φ(A_{r=8}, A_{r=64}, 1, 1), the overlap of the two ranks'
  top directions, same seed; the paper sees it above 0.5. Beside it, two seeds of r = 64 and a
  Gaussian baseline (≈ 1/k).
- ``amplification`` (LoRA Table 7): ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V ΔW's top-r directions. The paper:
  21.6 at r = 4, 1.9 at r = 64, i.e. a low-rank ΔW amplifies directions W does not emphasize
  (‖Uᵀ W V‖_F far below W's own top-r projection) and the factor falls as r grows.
- ``lorma_rank`` (LoRMA Table 15): the numerical rank of ΔW: at most r for LoRA and LoRMA+
  (ΔW = s·B·A·W0), almost full for LoRMA-π (1021 of 1024 at r = 8).
- ``lorma_correlation`` (LoRMA Table 9): cosine of ΔW_LoRMA with ΔW_LoRA (same seed) against the
  cosine of a Gaussian matrix with ΔW_LoRA; the paper: 0.074 (LoRMA+) and 0.004 (LoRMA-π) against
  1e-4, "a high correlation compared to a random matrix".
"""
from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import torch

from . import verdicts as F
from .summary import _mean, _sd

R_LOW, R_HIGH = 8, 64  # the lora_paper suite's kept ranks (the paper's Figs. 3-4 compare r=8 and r=64)


# --- kept adapters -----------------------------------------------------------------------------
def _rank(t: dict) -> int | None:
    r = (t.get("spec") or {}).get("rank", t["config"].get("rank"))
    return None if r is None else int(r)


def kept(trials: list[dict], variant: str, rank: int | None = None) -> dict[float, dict[int, dict]]:
    """lr -> seed -> trial, for done trials of ``variant`` (of ``rank``) that kept their adapter."""
    out: dict = defaultdict(dict)
    for t in F.done(trials):
        if (t["config"]["variant"] == variant and (t.get("result") or {}).get("adapter_dir")
                and (rank is None or _rank(t) == rank)):
            out[float(t["config"]["lr"])][int(t["config"]["seed"])] = t
    return out


def best_lr(by_lr: dict[float, dict[int, dict]], among=None) -> float | None:
    """The rate with the highest mean metric over its kept seeds (restricted to ``among``)."""
    lrs = [lr for lr in by_lr if among is None or lr in among]
    return max(lrs, key=lambda lr: _mean([t["metric"] for t in by_lr[lr].values()])) if lrs else None


@lru_cache(maxsize=64)
def weights(folder: str) -> dict:
    """{"delta": {path: ΔW}, "W": {path: W}, "A": {path: A} or None} of a kept run, in the adapter's
    dtype (the numerical rank's tolerance is that dtype's rounding; the analyses compute in float64
    where they need it)."""
    from ..analysis import base_weights_of, delta_weights, load_run, lora_factors
    from ..errors import LorazooError

    _, handle, _ = load_run(folder)
    try:
        A = {p: a for p, (_, a) in lora_factors(handle).items()}
    except LorazooError:
        A = None
    return {"delta": delta_weights(handle), "W": base_weights_of(handle), "A": A}


def _folder(t: dict) -> str:
    return str(t["result"]["adapter_dir"])


def _missing(ts) -> str | None:
    import os

    gone = [_folder(t) for t in ts if not os.path.isdir(_folder(t))]
    return f"the kept adapters are not on this machine (e.g. {gone[0]}): rerun the suite here" if gone else None


def _layer_mean(fn, *dicts) -> float:
    """Mean over the layers common to ``dicts`` of ``fn(tensor per dict)``."""
    return _mean([fn(*(d[p] for d in dicts)) for p in dicts[0] if all(p in d for d in dicts)])


def _cell(xs: list[float]) -> tuple[float, float, int]:
    return _mean(xs), _sd(xs), len(xs)


# --- the checks ---------------------------------------------------------------------------------
def _phi11(A1: torch.Tensor, A2: torch.Tensor) -> float:
    from ..analysis import subspace_similarity

    return subspace_similarity(A1, A2, 1, 1)


def check_subspace(trials: list[dict]) -> F.Verdict:
    from ..analysis.subspace import random_gaussian_like

    low, high = kept(trials, "lora", R_LOW), kept(trials, "lora", R_HIGH)
    lr = best_lr(low, among=set(high))
    if lr is None:
        return F.Verdict(F.NOT_RUN, "", f"no rate with kept LoRA adapters of both r={R_LOW} and r={R_HIGH}")
    seeds = sorted(set(low[lr]) & set(high[lr]))
    why = _missing([low[lr][s] for s in seeds] + [high[lr][s] for s in seeds])
    if why:
        return F.Verdict(F.UNTESTABLE, "", why)
    w = {(r, s): weights(_folder(by[lr][s])) for r, by in ((R_LOW, low), (R_HIGH, high)) for s in seeds}
    if any(v["A"] is None for v in w.values()):
        return F.Verdict(F.UNTESTABLE, "", "the kept adapters have no B·A factors")
    pair = _cell([_layer_mean(_phi11, w[R_LOW, s]["A"], w[R_HIGH, s]["A"]) for s in seeds])
    rand = _cell([_layer_mean(lambda A: _phi11(A, random_gaussian_like(A, s)), w[R_LOW, s]["A"]) for s in seeds])
    cross = [_layer_mean(_phi11, w[R_HIGH, a]["A"], w[R_HIGH, b]["A"]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    ours = (f"lr {lr:g}: φ(A_r={R_LOW}, A_r={R_HIGH}, 1, 1) {F.fmt(pair)} (mean over the layers); Gaussian "
            f"baseline {F.fmt(rand)}" + (f"; r={R_HIGH} seed against seed {F.fmt(_cell(cross))}" if cross else ""))
    m, sd, n = pair
    if n < F.MIN_SEEDS:
        return F.Verdict(F.UNTESTABLE, ours, F.seed_reason(n))
    se = sd / math.sqrt(n)
    if m - F.Z * se > 0.5:
        return F.Verdict(F.HOLDS, ours, "the top direction of the r=8 adapter lies in the r=64 one (φ > 0.5 beyond 2 SE)")
    if m + F.Z * se < 0.5:
        return F.Verdict(F.FAILS, ours, "φ of the two ranks' top directions is below 0.5 by more than 2 SE")
    return F.Verdict(F.UNTESTABLE, ours, "φ is within 2 SE of 0.5")


def _amp_per_seed(w: dict, r: int) -> tuple[float, float]:
    """(mean amplification factor, mean ‖Uᵀ W V‖ over W's own top-r projection) over the layers."""
    from ..analysis import amplification

    rows = [amplification(w["W"][p], d, r=r) for p, d in w["delta"].items()]
    return _mean([a["amplification"] for a in rows]), _mean([a["proj_delta"] / a["proj_weight"] for a in rows])


def check_amplification(trials: list[dict]) -> F.Verdict:
    per_rank = {}
    for r in (R_LOW, R_HIGH):
        by = kept(trials, "lora", r)
        lr = best_lr(by)
        if lr is None:
            return F.Verdict(F.NOT_RUN, "", f"no kept LoRA adapter of rank {r}")
        why = _missing(by[lr].values())
        if why:
            return F.Verdict(F.UNTESTABLE, "", why)
        per_rank[r] = (lr, [_amp_per_seed(weights(_folder(t)), r) for _, t in sorted(by[lr].items())])
    amp = {r: _cell([a for a, _ in v]) for r, (_, v) in per_rank.items()}
    rel = {r: _cell([x for _, x in v]) for r, (_, v) in per_rank.items()}
    ours = "; ".join(f"r={r} (lr {per_rank[r][0]:g}): factor {F.fmt(amp[r])}, ‖Uᵀ W V‖ / W's own top-{r} "
                     f"{F.fmt(rel[r])}" for r in amp)
    d, se = F.diff(amp[R_LOW], amp[R_HIGH])
    if not math.isfinite(se):
        return F.Verdict(F.UNTESTABLE, ours, F.seed_reason(min(a[2] for a in amp.values())))
    hidden = rel[R_LOW][0] + F.Z * rel[R_LOW][1] / math.sqrt(rel[R_LOW][2]) < 1
    if d - F.Z * se > 0 and amp[R_LOW][0] > 1 and hidden:
        return F.Verdict(F.HOLDS, ours, f"the r={R_LOW} update amplifies directions W does not emphasize (its "
                                        f"projection of W is below W's own top-{R_LOW}) and its factor is above "
                                        f"r={R_HIGH}'s beyond 2 SE")
    if d + F.Z * se < 0 or not hidden:
        return F.Verdict(F.FAILS, ours, f"the r={R_LOW} factor is not above r={R_HIGH}'s, or ΔW's directions are "
                                        f"W's own top ones")
    return F.Verdict(F.UNTESTABLE, ours, f"the two ranks' factors differ by {d:.2f}, within 2 SE ({se:.2f})")


def _rank_fraction(D: torch.Tensor) -> float:
    from ..analysis import numerical_rank

    return numerical_rank(D) / min(D.shape)


def check_lorma_rank(trials: list[dict]) -> F.Verdict:
    rank_of, parts = {}, []
    for v in ("lora", "lorma_plus", "lorma_pi"):
        by = kept(trials, v)
        lr = best_lr(by)
        if lr is None:
            continue
        why = _missing(by[lr].values())
        if why:
            return F.Verdict(F.UNTESTABLE, "", why)
        ts = list(by[lr].values())
        r = _rank(ts[0])
        fr = [_layer_mean(_rank_fraction, weights(_folder(t))["delta"]) for t in ts]
        top = max(round(_rank_fraction(D) * min(D.shape)) for t in ts for D in weights(_folder(t))["delta"].values())
        rank_of[v] = (r, _cell(fr), top)
        parts.append(f"{v} (r={r}, lr {lr:g}): rank(ΔW)/min(d, k) {F.fmt(_cell(fr))}, largest rank {top:.0f}")
    if "lorma_pi" not in rank_of and "lorma_plus" not in rank_of:
        return F.Verdict(F.NOT_RUN, "", "no kept LoRMA adapters")
    ours = "; ".join(parts)
    low = [v for v in ("lora", "lorma_plus") if v in rank_of and rank_of[v][2] > rank_of[v][0]]
    if low:
        return F.Verdict(F.FAILS, ours, f"{', '.join(low)}: a ΔW of rank above r")
    if "lorma_pi" in rank_of:
        (m, sd, n) = rank_of["lorma_pi"][1]
        if m < 0.9:
            return F.Verdict(F.FAILS, ours, "LoRMA-π's ΔW is not near full rank (below 90% of min(d, k))")
    return F.Verdict(F.HOLDS, ours, "LoRA's and LoRMA+'s ΔW have rank at most r; LoRMA-π's is near full rank"
                     if "lorma_pi" in rank_of else "LoRMA+'s ΔW has rank at most r (no LoRMA-π kept)")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def check_lorma_correlation(trials: list[dict]) -> F.Verdict:
    lora = kept(trials, "lora")
    llr = best_lr(lora)
    if llr is None:
        return F.Verdict(F.NOT_RUN, "", "no kept LoRA adapters to compare LoRMA's with")
    verdicts, parts = [], []
    for v in ("lorma_plus", "lorma_pi"):
        by = kept(trials, v)
        lr = best_lr(by)
        if lr is None:
            continue
        seeds = sorted(set(by[lr]) & set(lora[llr]))
        why = _missing([by[lr][s] for s in seeds] + [lora[llr][s] for s in seeds])
        if why:
            return F.Verdict(F.UNTESTABLE, "", why)
        cos, rnd = [], []
        for s in seeds:
            dl, dv = weights(_folder(lora[llr][s]))["delta"], weights(_folder(by[lr][s]))["delta"]
            g = torch.Generator().manual_seed(s)
            cos.append(_layer_mean(_cosine, dl, dv))
            rnd.append(_layer_mean(lambda a: abs(_cosine(a, torch.randn(a.shape, generator=g, dtype=a.dtype))), dl))
        c, r = _cell(cos), _cell(rnd)
        d, se = F.diff(c, r)
        parts.append(f"cos(ΔW_LoRA, ΔW_{v}) {F.fmt(c)} against |cos| with a Gaussian {F.fmt(r)}")
        verdicts.append(F.UNTESTABLE if not math.isfinite(se) else F.HOLDS if d - F.Z * se > 0 else F.FAILS)
    if not verdicts:
        return F.Verdict(F.NOT_RUN, "", "no kept LoRMA adapters")
    ours = f"LoRA at lr {llr:g}; " + "; ".join(parts)
    if F.UNTESTABLE in verdicts:
        return F.Verdict(F.UNTESTABLE, ours, F.seed_reason(1))
    if F.FAILS in verdicts:
        return F.Verdict(F.FAILS, ours, "a LoRMA update is no more aligned with LoRA's than a random matrix (2 SE)")
    return F.Verdict(F.HOLDS, ours, "each LoRMA update is more aligned with LoRA's than a random matrix, beyond 2 SE")
