"""CorDA: context-oriented decomposition of W0 C, the adapter taken from its smallest (KPA) or largest
(IPA) components and the base keeping the rest (study Eq. 110-115, [84]).

With C the input covariance of a target layer over the calibration batches, the authors' code
(iboing/CorDA ``cordalib/decomposition.py``, and PEFT's ``corda`` init written from it) damps it,
decomposes the weight times the damped covariance and maps the right factor back:

    C_d = C + δ·mean(diag C)·I,   W0 C_d = U S Vᵀ (exact SVD),   W0 = U S (Vᵀ C_d⁻¹)   (Eq. 110-111)

In torch's (out, in) layout, for the chosen set k of r triplets and the form's scale s:

    B = U_k sqrt(S_k / s)   (out, r),   A = sqrt(S_k / s) (Vᵀ C_d⁻¹)_k   (r, in),   base W0 - s·B·A

so s·B·A = U_k S_k (Vᵀ C_d⁻¹)_k and the model starts exactly as the base model (the residual is formed
from the stored factors through :func:`.svd.set_factors`, so save/load and delete reproduce and undo
it). ``corda_mode`` picks k:

- ``"kpa"``, knowledge-preserved adaptation (Eq. 112-113): the r *smallest* singular triplets; the
  principal ones, which carry what the calibration data (the paper: world-knowledge QA questions)
  activates, stay in the frozen base.
- ``"ipa"``, instruction-previewed adaptation (Eq. 114-115): the r *largest* triplets; calibration
  on the fine-tuning data itself previews the task's directions in the trainable part.

The study's Eq. 112-115 write S^-1/2 on both factors; then the factors' product would not be the
removed component and the model would not start as the base. The authors' code (``sigma_fuse="UV"``)
and PEFT use S^+1/2 on each side, as here. The study writes C·W̃ in its transposed (in, out)
convention; that is our W0·C.

Choices, stated plainly:
- Damping (the authors' robust inverse): δ starts at ``corda_damp`` (0.01 in the authors' code and
  PEFT) and doubles until ‖C_d C_d⁻¹ - I‖_F < 0.05 (their threshold); C_d, not C, is the matrix
  decomposed, so the decomposition of W0 is exact whatever δ. δ is relative to the mean diagonal, so
  it does not depend on the covariance's overall size. A C_d that is singular in the working
  precision counts as a failed check (the authors' ``torch.linalg.inv`` would raise) and δ doubles.
- Normalization: C = Σ x xᵀ / rows (the uncentered second moment E[x xᵀ] over the calibration rows,
  padding rows left out as in :mod:`.calibration`). The authors divide each sequence by its largest
  activation (an fp16-overflow guard of their hook) and average over sequences. Multiplying C by a
  constant changes neither the chosen components nor s·B·A, only the balance of B against A (S
  scales with C); E[x xᵀ] makes that balance independent of the amount of calibration data.
- Scale: the 1/s inside the root is PEFT's (``S /= scaling``), as PiSSA: s·B·A, not B·A, is the
  removed component whatever alpha, r and the scale part (rsLoRA...) are. The authors' own adapter
  has no scale (s = 1).
- Default ``corda_mode="ipa"``: PEFT's default (``corda_method="ipm"``, which its docs favour when
  preserving pre-training knowledge is not a concern), and the mode whose premise matches how lorazoo
  is used: ``adapt(calibration=...)`` gets batches of the task's own data, which is what IPA
  calibrates on. KPA (the authors' script default) is the ``corda_kpa`` preset; give it batches of
  world-knowledge questions to get the paper's setting.
- Everything is computed in ``prepare``, before the model changes (only the r chosen triplets are
  kept per layer), so a failing layer leaves the model untouched; the SVD is exact, in at least
  float32, like the authors'.
- Forms: any form with plain B·A factors ('lora', 'dora': its magnitude is taken from residual +
  s·B·A = W0; 'moslora': its mixer is set to I when B is nonzero); forms without them are refused
  when the spec is built (the shared check of :class:`..parts.Init`), naming the form.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..layer import is_conv1d
from ..parts import check_number
from ..qbase import dequantize, is_quantized
from ..registry import INITS
from .calibration import CalibratedInit, work_dtype
from .svd import set_factors, top_svd

MODES = ("ipa", "kpa")
INVERSE_TOLERANCE = 0.05  # the authors' bound on ‖C_d C_d⁻¹ - I‖_F
MAX_DOUBLINGS = 64


def damped_inverse(C: torch.Tensor, damp: float, who: str = "corda"):
    """(C_d, C_d⁻¹, δ): C_d = C + δ·mean(diag C)·I with the first δ = damp·2^k that inverts well."""
    if not torch.isfinite(C).all():
        raise SpecError(f"{who}: the input covariance has inf/nan entries; check the calibration batches")
    level = C.diagonal().mean()
    if level <= 0:
        raise SpecError(f"{who}: every calibration input is zero, so the covariance is zero and cannot be "
                        f"inverted; pass batches that reach this layer with nonzero inputs or exclude it")
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for _ in range(MAX_DOUBLINGS):
        fixed = C + eye * (level * damp)
        inverse, info = torch.linalg.inv_ex(fixed)  # singular in this precision: info > 0, damp more
        if not info.any() and torch.dist(fixed @ inverse, eye) < INVERSE_TOLERANCE:
            return fixed, inverse, damp
        damp *= 2
    raise SpecError(f"{who}: could not invert the damped input covariance (damping up to {damp:g}·mean diag)")


@INITS.register("corda", paper="CorDA (Yang et al., NeurIPS 2024) [84]",
                equations="study Eq. 110-115: W0 C = U S Vᵀ, W0 = U S (Vᵀ C⁻¹); B = U_k S_k^1/2, "
                          "A = S_k^1/2 (Vᵀ C⁻¹)_k, k = r smallest (KPA) or largest (IPA); base W0 - s·B·A",
                summary="covariance-oriented SVD of W0·C; minor (KPA) or principal (IPA) part in the adapter, "
                        "the rest in the frozen base")
class CorDA(CalibratedInit):
    """CorDA. Options: ``corda_mode`` ("ipa" default, or "kpa"), ``corda_damp`` (initial damping of
    the covariance, relative to its mean diagonal, default 0.01 as in the authors' code)."""

    collects = ("cov",)
    options = {"corda_mode": "ipa", "corda_damp": 0.01}

    @classmethod
    def validate(cls, opts):
        if opts["corda_mode"] not in MODES:
            raise SpecError(f"corda_mode must be 'ipa' (instruction-previewed: largest components) or 'kpa' "
                            f"(knowledge-preserved: smallest components), got {opts['corda_mode']!r}")
        check_number("corda_damp", opts["corda_damp"], strict=True)

    def prepare(self, model, targets, calibration):
        super().prepare(model, targets, calibration)
        opts, r = self.spec.options, self.spec.rank
        self.parts = {}
        for path, module in targets.items():
            stats = self.stats.pop(path)
            W = dequantize(module) if is_quantized(module) else module.weight.detach()  # lorazoo.qbase
            W = (W.t() if is_conv1d(module) else W).to(work_dtype(W.dtype))
            C = stats.cov.to(W.dtype) / stats.rows
            stats.cov = None
            fixed, inverse, _ = damped_inverse(C, float(opts["corda_damp"]), who=f"init 'corda', layer {path!r}")
            del C
            n = min(W.shape)
            U, S, V = top_svd(W @ fixed, n)  # descending singular values
            keep = slice(n - r, n) if opts["corda_mode"] == "kpa" else slice(0, r)
            self.parts[path] = (U[:, keep], S[keep], V[:, keep].mT @ inverse)  # rows k of Vᵀ C_d⁻¹
        self.stats = {}

    def apply(self, path, adapter, layer, weight):
        U, S, right = self.parts.pop(path)
        if S.shape[0] != adapter.form.rank:
            raise SpecError(f"init 'corda' computed {S.shape[0]} components for {path!r} but its form has "
                            f"rank {adapter.form.rank}")
        root = (S / adapter.form.scale).sqrt()
        set_factors(adapter, weight, U * root, root[:, None] * right, shift=True)
