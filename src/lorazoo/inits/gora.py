"""GoRA: per-layer ranks and B from the calibration gradient (study Eq. 51-53 and 107-109, [62]).

He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation" (NeurIPS 2025); official code
hhnqqq/MyTransformers, ``common/lora_modules/gora.py``. One calibration pass (calibration.collect,
as LoRA-GA) gives G = dL/dW (out, in) per target, averaged over the batches.

Rank allocation (Eq. 51-53). For target i with weight W_i (out, in) and f_i = in_i + out_i:

    I_i = avg |W_i ⊙ G_i|,  a_i = I_i / Σ_j I_j                  (Eq. 51)
    P = Σ_i f_i · r_ref                                        (Eq. 52; r_ref = spec.rank)
    r_i* = P · a_i / f_i,  r_min <= r_i <= r_max               (Eq. 53)

so layer i gets the share a_i of LoRA-r_ref's parameter count P. Choices:
- The study's Eq. 53 divides P by sqrt(f_i) while its Eq. 52 counts f_i: read literally, ranks
  come out sqrt(f)·r_ref-fold too large. The authors' code computes the budget and the division
  with the same feature function (``gora_features_func``; default none = f, ``sqrt`` = sqrt(f)),
  which is ``gora_features`` here ("linear" default, as the code's default; "sqrt" is the study's
  Eq. 53 denominator with the matching budget Σ sqrt(f_i)·r_ref).
- Importance: ``gora_importance`` "mean" is Eq. 51 (and the paper); "frobenius" is ‖W ⊙ G‖_F, the
  official code's default (``union_frobenius_norm``).
- Bounds and the budget are met exactly, where the code (round, then clip) can miss both: r_i* is
  clipped by water-filling (a common factor on P·a_i/f_i is solved for so that the clipped Σ f_i r_i*
  is P; with no bound active the factor is 1 and r_i* is Eq. 53's value), then each rank is
  rounded down and whole ranks are handed out by largest remainder (ties: earlier layer) while one
  more fits in the budget, in passes until none fits. So Σ f_i·r_i <= P, no layer that may still
  grow fits in the leftover, and for layers of one shape Σ r_i = L·r_ref exactly (tested).
  r_min (``gora_min_rank``, default 1 as the code) keeps every layer adapted (a rank-0 form has no
  defined scale); r_max is ``gora_max_rank`` (0 = no bound but the form's own limit).

Init (Eq. 107-108). In torch's (out, in) layout (the study writes W transposed, its A0 (in, r) on
the input side is our Aᵀ, its B0 our Bᵀ):

    A ~ U(-1/sqrt(in), 1/sqrt(in))   (r, in)
    B = -(gamma · sqrt(in) / alpha) · G · A⁺,  A⁺ = Aᵀ (A Aᵀ)⁻¹   (out, r)

so B·A = -(gamma·sqrt(in)/alpha) · G · A⁺A, the best rank-r compression of -G given A (A⁺A is the
projector onto A's rows, Eq. 107). With the rsLoRA scale alpha/sqrt(r_i) of the preset (Eq. 109),
s·B·A = -gamma·sqrt(in/r_i)·G·A⁺A, whose norm is about gamma·‖G‖ for a random A (the projector keeps
about r/in of G's energy): the adapter starts at one gradient step of size gamma. The official code
omits the sqrt(in) factor (its gamma absorbs it; argument default 0.02); here Eq. 108 is followed
with ``gora_gamma`` = 0.02. The pseudo-inverse is ``torch.linalg.pinv`` in at least float32 (the
code adds 1e-8·I to A Aᵀ; a random A has full row rank).
As the paper stresses, the base is not changed ("non-manipulative"), so the model does not start as
the base model (``starts_as_base = False``), as LoRA-One.
"""
from __future__ import annotations

import math

import torch

from ..errors import SpecError
from ..layer import base_weights
from ..parts import check_choice, check_number
from ..registry import INITS
from .calibration import CalibratedInit, rank_summary, shape_of, work_dtype
from .svd import set_factors

FEATURES = {"linear": lambda f: float(f), "sqrt": math.sqrt}
IMPORTANCE = ("mean", "frobenius")


def importance(weight: torch.Tensor, grad: torch.Tensor, kind: str = "mean") -> float:
    """Eq. 51's I = avg|W ⊙ G| ("mean") or the official code's ‖W ⊙ G‖_F ("frobenius")."""
    prod = weight.to(grad.dtype) * grad
    return float(prod.abs().mean() if kind == "mean" else torch.linalg.matrix_norm(prod))


def allocate(shares: dict[str, float], features: dict[str, float], r_ref: int,
             low: dict[str, int], high: dict[str, int]) -> dict[str, int]:
    """Integer ranks r_i in [low_i, high_i] for the budget P = Σ f_i·r_ref split by ``shares`` a_i.

    Real ranks r_i* = clip(c·P·a_i/f_i, low_i, high_i) with c solved so that Σ f_i r_i* = P (c = 1
    when no bound is active: Eq. 53); then floor, and one more rank by largest remainder while it
    fits in P, repeated until none fits. Needs Σ f_i·low_i <= P <= Σ f_i·high_i.
    """
    paths = list(shares)
    P = sum(features[p] * r_ref for p in paths)
    want = {p: P * shares[p] / features[p] for p in paths}

    def clipped(c):
        return {p: min(max(c * want[p], low[p]), high[p]) for p in paths}

    def used(c):
        return sum(features[p] * v for p, v in clipped(c).items())

    lo_c, hi_c = 0.0, 1.0
    while used(hi_c) < P and hi_c < 1e30:
        hi_c *= 2.0
    for _ in range(200):  # used(c) is non-decreasing in c
        mid = 0.5 * (lo_c + hi_c)
        lo_c, hi_c = (mid, hi_c) if used(mid) < P else (lo_c, mid)
    c = 1.0 if abs(used(1.0) - P) <= 1e-9 * P else hi_c
    real = clipped(c)
    ranks = {p: max(int(math.floor(real[p] + 1e-9)), low[p]) for p in paths}
    left = P - sum(features[p] * ranks[p] for p in paths)
    order = sorted(range(len(paths)), key=lambda i: (-(real[paths[i]] - ranks[paths[i]]), i))
    grew = True
    while grew:
        grew = False
        for i in order:
            p = paths[i]
            if ranks[p] < high[p] and features[p] <= left + 1e-9 * P:
                ranks[p] += 1
                left -= features[p]
                grew = True
    return ranks


class GradientRankInit(CalibratedInit):
    """Shared by GoRA and RaLoRA-Pro: the gradient pass, Eq. 51's shares and Eq. 52-53's ranks.
    A subclass names its options through ``prefix`` (``<prefix>_min_rank`` etc.)."""

    collects = ("grad",)
    prefix = "gora"

    @classmethod
    def summary(cls, handle):
        return rank_summary(handle)

    @classmethod
    def validate_allocation(cls, opts, prefix):
        check_number(f"{prefix}_min_rank", opts[f"{prefix}_min_rank"], minimum=1, integer=True)
        check_number(f"{prefix}_max_rank", opts[f"{prefix}_max_rank"], minimum=0, integer=True)
        check_choice(f"{prefix}_features", opts[f"{prefix}_features"], FEATURES)
        check_choice(f"{prefix}_importance", opts[f"{prefix}_importance"], IMPORTANCE)
        top = opts[f"{prefix}_max_rank"]
        if top and top < opts[f"{prefix}_min_rank"]:
            raise SpecError(f"{prefix}_max_rank ({top}) must be 0 (no bound) or >= {prefix}_min_rank "
                            f"({opts[f'{prefix}_min_rank']})")

    def rank_bounds(self, n_in: int, n_out: int) -> tuple[int, int]:
        o, pre = self.spec.options, self.prefix
        form_cls = self.spec.part_classes()["form"]
        limit = form_cls.rank_limit(n_in, n_out, self.spec.options)
        top = o[f"{pre}_max_rank"] or limit
        return o[f"{pre}_min_rank"], min(top, limit)

    def check_targets(self, targets):
        r = self.spec.rank
        for path, module in targets.items():
            lo, hi = self.rank_bounds(*shape_of(module))
            if not lo <= r <= hi:
                raise SpecError(f"init '{self.part_name}': the reference rank {r} must lie within the rank "
                                f"bounds [{lo}, {hi}] of layer {path!r} ({self.prefix}_min_rank, "
                                f"{self.prefix}_max_rank and the form's limit)")

    def allocate_ranks(self, targets) -> dict[str, int]:
        o, pre = self.spec.options, self.prefix
        weights = base_weights(targets)
        imp = {p: importance(weights[p].detach(), self.stats[p].grad, o[f"{pre}_importance"]) for p in targets}
        total = sum(imp.values())
        if not total > 0:
            raise SpecError(f"init '{self.part_name}': the calibration gradient is zero on every target layer "
                            f"(the loss does not depend on them); no importance to allocate ranks by")
        feat = {p: FEATURES[o[f"{pre}_features"]](sum(shape_of(m))) for p, m in targets.items()}
        bounds = {p: self.rank_bounds(*shape_of(m)) for p, m in targets.items()}
        return allocate({p: v / total for p, v in imp.items()}, feat, self.spec.rank,
                        {p: b[0] for p, b in bounds.items()}, {p: b[1] for p, b in bounds.items()})

    def ranks(self):
        return dict(self._ranks)


@INITS.register("gora", paper="GoRA (He et al., NeurIPS 2025) [62]",
                equations="study Eq. 51-53: I = avg|W⊙G|, P = Σ(m+n)·r_ref, r_i = P·a_i/(m_i+n_i) in "
                          "[r_min, r_max]; Eq. 107-108: A ~ U(±1/sqrt(in)), B = -(gamma·sqrt(in)/alpha)·G·A⁺",
                summary="per-layer ranks from gradient importance under LoRA's parameter budget; B compresses "
                        "the calibration gradient through the pseudo-inverse of a random A; base untouched")
class GoRA(GradientRankInit):
    """GoRA. Options: ``gora_gamma`` (Eq. 108's gamma, default 0.02), ``gora_min_rank`` (1),
    ``gora_max_rank`` (0 = the form's limit), ``gora_features`` ("linear" | "sqrt"),
    ``gora_importance`` ("mean" = Eq. 51 | "frobenius" = the official code's default)."""

    starts_as_base = False
    options = {"gora_gamma": 0.02, "gora_min_rank": 1, "gora_max_rank": 0, "gora_features": "linear",
               "gora_importance": "mean"}

    @classmethod
    def validate(cls, opts):
        check_number("gora_gamma", opts["gora_gamma"])
        cls.validate_allocation(opts, "gora")

    def prepare(self, model, targets, calibration):
        super().prepare(model, targets, calibration)
        self._ranks = self.allocate_ranks(targets)

    def apply(self, path, adapter, layer, weight):
        B, A = adapter.form.factors()
        r, n_in = A.shape
        dtype = work_dtype(weight.dtype)
        G = self.stats[path].grad.to(dtype)
        self.stats[path].grad = None
        bound = 1.0 / math.sqrt(n_in)
        A0 = torch.empty(r, n_in, dtype=dtype, device=weight.device).uniform_(-bound, bound)
        gamma = self.spec.options["gora_gamma"]
        B0 = -(gamma * math.sqrt(n_in) / self.spec.alpha) * (G @ torch.linalg.pinv(A0))
        set_factors(adapter, weight, B0.to(B.dtype), A0.to(A.dtype), shift=False)
