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

:class:`GradientSVDInit` is the part shared with LoRA-One (lora_one.py): the gradient pass, the
options gamma and niter, and the SVD of each layer's G.
"""
from __future__ import annotations

from ..errors import SpecError
from ..parts import check_number
from ..registry import INITS
from .calibration import CalibratedInit, shape_of
from .svd import set_factors, top_svd


class GradientSVDInit(CalibratedInit):
    """Shared body of the inits built from the SVD of the calibration gradient G (LoRA-GA, LoRA-One).

    A subclass names its two options: ``gamma_option`` (a scale divisor, > 0) and ``niter_option``
    (0 = exact SVD of G; n > 0 = randomized SVD with n subspace iterations).
    """

    collects = ("grad",)
    gamma_option = ""
    niter_option = ""

    @classmethod
    def validate(cls, opts):
        check_number(cls.gamma_option, opts[cls.gamma_option], strict=True)
        check_number(cls.niter_option, opts[cls.niter_option], integer=True)

    @property
    def gamma(self) -> float:
        return float(self.spec.options[self.gamma_option])

    def gradient_svd(self, path: str, k: int, negate: bool = False):
        """(U, S, V) of the top k singular triplets of G (of -G with ``negate``) at ``path``.

        Frees the layer's (out, in) gradient: each layer's is read once.
        """
        G = self.stats[path].grad
        self.stats[path].grad = None
        return top_svd(-G if negate else G, k, self.spec.options[self.niter_option])


@INITS.register("lora_ga", paper="LoRA-GA (Wang et al., 2024) [27]",
                equations="study Eq. 99-102: G = U S Vᵀ, A = c·V[:, :r]ᵀ, B = c·U[:, r:2r], "
                          "c = d_out^1/4 / sqrt(gamma), base W0 - s·B·A",
                summary="factors from the SVD of the calibration gradient, base shifted to start at the base")
class LoRAGA(GradientSVDInit):
    """LoRA-GA. Options: ``lora_ga_gamma`` (gamma of Eq. 102, default 16 as in the paper's code),
    ``lora_ga_niter`` (0 = exact SVD of G; n > 0 = randomized SVD with n subspace iterations)."""

    gamma_option, niter_option = "lora_ga_gamma", "lora_ga_niter"
    options = {"lora_ga_gamma": 16.0, "lora_ga_niter": 0}

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
        r = adapter.form.rank
        U, _, V = self.gradient_svd(path, 2 * r)
        c = U.shape[0] ** 0.25 / self.gamma ** 0.5
        set_factors(adapter, weight, c * U[:, r:2 * r], c * V[:, :r].mT, shift=True)
