"""LoRA-GA: initialize B·A so LoRA's first step approximates full fine-tuning's (study Eq. 99-102, [27]).

The calibration pass gives each target the mean gradient G = dL/dW0 (out, in) over the batches.
With G = U S Vᵀ (Eq. 100) and c = d_out^(1/4) / sqrt(gamma) (the scale-stable factor of Eq. 102),

    A = c · V[:, :r]ᵀ          (r, in)     the top-r right singular vectors
    B = c · U[:, r:2r]         (out, r)    left singular vectors r+1 .. 2r (Eq. 101)

(the paper's Algorithm 1 in torch's (out, in) layout, its default "ArB2r" direction; the study
writes the same in the transposed convention). Then the first-step projection
P = B Bᵀ G + G Aᵀ A (Eq. 99) equals c²·G_2r, the best rank-2r approximation of G. The base is
shifted by -s·B·A so the model starts at the base output. The paper writes the fourth root as
sqrt[4](d_out) with d_out the output size (its code: ``m**0.25`` with m = feature_out).
"""
from __future__ import annotations

from ..errors import SpecError
from ..parts import check_number
from ..registry import INITS
from .calibration import CalibratedInit, shape_of
from .svd import set_factors, top_svd


@INITS.register("lora_ga", paper="LoRA-GA (Wang et al., 2024) [27]",
                equations="study Eq. 99-102: G = U S Vᵀ, A = c·V[:, :r]ᵀ, B = c·U[:, r:2r], "
                          "c = d_out^1/4 / sqrt(gamma), base W0 - s·B·A",
                summary="factors from the SVD of the calibration gradient, base shifted to start at the base")
class LoRAGA(CalibratedInit):
    """LoRA-GA. Options: ``lora_ga_gamma`` (gamma of Eq. 102, default 16 as in the paper's code),
    ``lora_ga_niter`` (0 = exact SVD of G; n > 0 = randomized SVD with n subspace iterations)."""

    collects = ("grad",)
    options = {"lora_ga_gamma": 16.0, "lora_ga_niter": 0}

    @classmethod
    def validate(cls, opts):
        check_number("lora_ga_gamma", opts["lora_ga_gamma"], strict=True)
        check_number("lora_ga_niter", opts["lora_ga_niter"], integer=True)

    def check_targets(self, targets):
        r = self.spec.rank
        for path, module in targets.items():
            n_in, n_out = shape_of(module)
            if 2 * r > min(n_in, n_out):
                raise SpecError(
                    f"init 'lora_ga' uses 2r = {2 * r} singular vectors of each gradient, but layer {path!r} "
                    f"({n_in} -> {n_out}) has only {min(n_in, n_out)}; use rank <= {min(n_in, n_out) // 2} "
                    f"or exclude this layer from targets")

    def apply(self, path, adapter, layer, weight):
        G = self.stats[path].grad
        r, n_out = adapter.form.rank, G.shape[0]
        U, _, V = top_svd(G, 2 * r, self.spec.options["lora_ga_niter"])
        c = n_out ** 0.25 / self.spec.options["lora_ga_gamma"] ** 0.5
        set_factors(adapter, weight, c * U[:, r:2 * r], c * V[:, :r].mT, shift=True)
        self.stats[path].grad = None  # free the (out, in) gradient once used
