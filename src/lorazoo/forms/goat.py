"""GOAT (Fan et al., ICML 2025 [90]; study Eq. 132): a mixture of LoRA experts with a scale derived
so that its gradient matches full fine-tuning's, and a Switch-style balancing loss.

Form: :class:`~lorazoo.forms.loramoe.ExpertMixture` (y = W0 x + s·Σ_i ω_i(x) B_i A_i x, top-k
renormalized router). Its SVD-segment init with the residual base is the init part 'goat'
(inits/goat.py); the 'goat' preset uses both.
"""
from __future__ import annotations

import math

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from ..routing import switch_loss
from .loramoe import ExpertMixture


@FORMS.register("goat", paper="GOAT (Fan et al., 2025) [90]",
                equations="study Eq. 124-126, 132; y = W0 x + s·Σ_i ω_i(x) B_i A_i x, s = sqrt(3·η·n / r_e), "
                          "L_aux = E·Σ_i f_i P_i",
                summary="LoRA experts with a full-fine-tuning-aligned scale and load balancing; "
                        "SVD-segment init with init='goat'")
class GOAT(ExpertMixture):
    """GOAT's mixture: ``experts`` LoRA experts of rank r_e = ⌈rank/experts⌉, top-k routing.

    Scale (``goat_scale='derived'``, the default): s = sqrt(3·η·n / r_e), n = in_features, the
    factor GOAT derives so that the equivalent gradient of s·B·A, s²·g·AᵀA with E[AᵀA] = r_e/(3n)·I
    for Kaiming-uniform A, equals η times full fine-tuning's gradient g (GOAT's code:
    ``sqrt(3*eta*in_features/rank)``; η = ``goat_eta``, its ETA, 1 in all its scripts). The scale
    part (alpha) is then not used, so only scale='lora' (the default) is accepted with it.
    ``goat_scale='spec'`` uses the scale part's s instead (the code's 'goat' init type, alpha/r_e).

    Auxiliary loss: ``goat_aux_weight`` x the load-balancing loss of study Eq. 126 (the code's
    ``get_layer_loss``, added with ``aux_loss_coeff`` = 1e-3 in all its scripts), per layer.
    The form's own init is LoRA's (B zero: starts as the base); GOAT's is init='goat'.
    """

    options = {"experts": 8, "top_k": 2, "goat_scale": "derived", "goat_eta": 1.0, "goat_aux_weight": 1e-3}
    scales = ("derived", "spec")

    @classmethod
    def validate(cls, opts):
        super().validate(opts)
        if opts["goat_scale"] not in cls.scales:
            raise SpecError(f"goat_scale must be 'derived' (s = sqrt(3·η·in/r)) or 'spec' (the scale part's "
                            f"alpha-based s), got {opts['goat_scale']!r}")
        check_number("goat_eta", opts["goat_eta"], strict=True)
        check_number("goat_aux_weight", opts["goat_aux_weight"])

    @classmethod
    def check_spec(cls, spec):
        if spec.options["goat_scale"] == "derived" and spec.scale != "lora":
            raise SpecError(f"form 'goat' derives its scale s = sqrt(3·η·in/r) (goat_scale='derived'), so "
                            f"scale={spec.scale!r} would be ignored; set goat_scale='spec' to use it")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        if opts["goat_scale"] == "derived":
            self.scale = self.derived_scale(in_features, self.expert_rank, float(opts["goat_eta"]))
        self.aux_weight = float(opts["goat_aux_weight"])

    @staticmethod
    def derived_scale(in_features: int, expert_rank: int, eta: float = 1.0) -> float:
        return math.sqrt(3.0 * eta * in_features / expert_rank)

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None or self.aux_weight == 0:
            return None
        return self.aux_weight * switch_loss(r)
