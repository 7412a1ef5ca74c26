"""EVA: A from the top principal directions of each layer's inputs, ranks redistributed by explained
variance (study Eq. 55, 116-123, [64]).

Eq. 121-123: A (r, in) maximizes Tr(A E[x xᵀ] Aᵀ) over orthonormal rows, so its rows are the top-r
eigenvectors of C = Xᵀ X (the right singular vectors of the activations X); B = 0, so the model
starts at the base. The rows are orthonormal as in the EVA paper and its code; the study's Eq. 123
also multiplies by S_C, which the paper does not.

Rank redistribution (Eq. 55 and EVA Sec. 3.2): every layer offers its top ``eva_rho``·r
components (capped by the form's largest rank); each component's explained variance ratio is
ξ_j = λ_j / Σ_i λ_i (the eigenvalues of C; Eq. 55's (M-1) cancels in the ratio); the total budget
r·L (L target layers) goes to the components with the largest ξ across all layers, and each layer
gets as many as it wins. ``eva_rho`` = 1 keeps every layer at r.

Deviations, on purpose:
- every layer keeps at least one component (its top one is always granted, the rest of the budget,
  r·L - L, is ranked globally). EVA's code lets a layer win none and removes its adapter; here a
  rank-0 form cannot be built (its scale alpha/r is undefined), and this is the smallest change.
- C is accumulated exactly over the whole calibration set and eigendecomposed once (memory in² per
  layer), instead of EVA's incremental SVD with a convergence check over batches; the result is
  the exact principal subspace the incremental one approximates. EVA's code centers the
  activations (incremental PCA); Eq. 120-122 use the uncentered E[x xᵀ], as here.
- the scale is the spec's s(alpha, r_layer) for each layer's own rank (EVA's
  ``adjust_scaling_factors=False``); with B = 0 it does not change the starting point.
Rows where a batch's ``attention_mask`` is 0 are left out, as EVA does for padding.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..parts import check_number
from ..registry import INITS
from .calibration import CalibratedInit, rank_summary, shape_of
from .svd import set_factors


def redistribute(ratios: dict[str, torch.Tensor], rank: int) -> dict[str, int]:
    """Per-layer ranks: each layer's first component, then the budget left by largest ratio.

    ``ratios[path]`` are the layer's candidate ratios in descending order; ties go to the earlier
    layer, then the earlier component.
    """
    budget = rank * len(ratios) - len(ratios)
    ranked = sorted(((-float(v), i, j, path) for i, (path, vals) in enumerate(ratios.items())
                     for j, v in enumerate(vals.tolist()) if j > 0))
    ranks = dict.fromkeys(ratios, 1)
    for _, _, _, path in ranked[:budget]:
        ranks[path] += 1
    return ranks


@INITS.register("eva", paper="EVA (Paischer et al., 2024) [64]",
                equations="study Eq. 121-123: A = top-r eigenvectors of XᵀX (rows), B = 0; Eq. 55: ranks by "
                          "explained variance ratio within the budget r·L",
                summary="activation principal directions in A, B zero, ranks redistributed across layers")
class EVA(CalibratedInit):
    """EVA. Option ``eva_rho`` (>= 1, default 2 as in EVA): each layer may grow to rho·r."""

    collects = ("cov",)
    options = {"eva_rho": 2.0}

    @classmethod
    def summary(cls, handle):
        return rank_summary(handle)

    @classmethod
    def validate(cls, opts):
        check_number("eva_rho", opts["eva_rho"], minimum=1.0)

    def prepare(self, model, targets, calibration):
        super().prepare(model, targets, calibration)
        form_cls = self.spec.part_classes()["form"]
        r = self.spec.rank
        self.directions, ratios = {}, {}
        for path, module in targets.items():
            n_in, n_out = shape_of(module)
            k = min(round(self.spec.options["eva_rho"] * r), form_cls.max_rank(n_in, n_out), n_in)
            C = self.stats[path].cov
            self.stats[path].cov = None  # free each (in, in) accumulator once decomposed
            vals, vecs = torch.linalg.eigh(C)  # ascending
            vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
            ratios[path] = vals[:k] / vals.sum().clamp_min(torch.finfo(vals.dtype).tiny)
            self.directions[path] = vecs[:, :k].mT.contiguous()  # (k, in), orthonormal rows
        self._ranks = redistribute(ratios, r)

    def ranks(self):
        return dict(self._ranks)

    def apply(self, path, adapter, layer, weight):
        B, A = adapter.form.factors()
        rows = self.directions.pop(path)[: A.shape[0]]
        if rows.shape[0] != A.shape[0]:
            raise SpecError(f"init 'eva' computed {rows.shape[0]} directions for {path!r} but its form has "
                            f"rank {A.shape[0]}")
        set_factors(adapter, weight, torch.zeros_like(B), rows, shift=False)
