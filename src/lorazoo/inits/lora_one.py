"""LoRA-One: the adapter starts at one (normalized, rank-r) full gradient step (study Eq. 104-106, [82]).

Zhang, Liu & Chen, "LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning Large Language
Models, Provably and Efficiently" (ICML 2025). With G = dL/dW0 (out, in), the mean gradient over
the calibration batches (calibration.collect, as LoRA-GA), and

    -G = U S Vᵀ,  S <- S / sigma_1   (Eq. 104; sigma_1 the largest singular value)
    B = U[:, :r] S_r^1/2 / sqrt(gamma)     (out, r)   (Eq. 105)
    A = S_r^1/2 V[:, :r]ᵀ / sqrt(gamma)    (r, in)    (Eq. 106)

in torch's (out, in) layout (the study writes it transposed, with its A on the input side: its
A0 = U S^1/2 is our B, its B0 = S^1/2 Vᵀ our A). Then B·A = -G_r / (gamma·sigma_1), so the adapted
weight at init is

    W0 + s·B·A = W0 - (s / (gamma·sigma_1)) · G_r,

one full-gradient descent step restricted to G's best rank-r part. The base is NOT shifted: as the
paper says, LoRA-One needs no weight manipulation, and its official code skips the offset it
applies for LoRA-GA (YuanheZ/LoRA-One, run_exp.py: ``if direction == "LoRA-One": pass``). The model
therefore does not start as the base model (``starts_as_base = False``). With DoRA the magnitude is
taken from W0 + s·B·A, as the official code does, so DoRA starts at the same point.

Choices:
- gamma: 128 (study Sec. IV-C4; the official config's ``stable_gamma``); the preset pairs it with
  the alpha/sqrt(r) scale, as the paper's formula W0 + (alpha/sqrt(r))·A0·B0 and its scripts
  (``use_rslora=True``) do.
- exact SVD by default (``lora_one_niter`` = 0); the official code uses torch.svd_lowrank (q = 512,
  niter = 16), available as ``lora_one_niter`` = n > 0.
- a layer whose calibration gradient is exactly zero has no sigma_1 to normalize by: refused before
  the model changes, naming the layer.
The gradient pass, the options and the SVD are shared with LoRA-GA (lora_ga.GradientSVDInit).
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..registry import INITS
from .lora_ga import GradientSVDInit
from .svd import set_factors


@INITS.register("lora_one", paper="LoRA-One (Zhang, Liu & Chen, ICML 2025) [82]",
                equations="study Eq. 104-106: -G = U S Vᵀ, S/sigma_1, B = U_r S_r^1/2 / sqrt(gamma), "
                          "A = S_r^1/2 V_rᵀ / sqrt(gamma); no base shift "
                          "(starts at W0 - s·G_r/(gamma·sigma_1))",
                summary="factors from the top-r SVD of minus the calibration gradient; the adapter starts at "
                        "one normalized gradient step, the base untouched")
class LoRAOne(GradientSVDInit):
    """LoRA-One. Options: ``lora_one_gamma`` (gamma of Eq. 105-106, default 128 as in the study),
    ``lora_one_niter`` (0 = exact SVD of G; n > 0 = randomized SVD with n subspace iterations)."""

    starts_as_base = False
    gamma_option, niter_option = "lora_one_gamma", "lora_one_niter"
    options = {"lora_one_gamma": 128.0, "lora_one_niter": 0}

    def prepare(self, model, targets, calibration):
        super().prepare(model, targets, calibration)
        flat = [p for p, s in self.stats.items() if not torch.any(s.grad)]
        if flat:
            raise SpecError(
                f"init 'lora_one' normalizes by the gradient's largest singular value, but the calibration "
                f"gradient of layer(s) {', '.join(flat[:5])} is zero (the loss does not depend on them); "
                f"exclude them from targets or use other calibration batches")

    def apply(self, path, adapter, layer, weight):
        U, S, V = self.gradient_svd(path, adapter.form.rank, negate=True)  # -G = U S Vᵀ
        root = (S / S[0]).sqrt() / self.gamma ** 0.5
        set_factors(adapter, weight, U * root, root[:, None] * V.mT, shift=False)
