"""AdaMoLE (Liu & Luo 2024 [88]; study Eq. 130-131): LoRA experts chosen per token by an adaptive
threshold instead of a fixed top-k.

y = W0 x + s·Σ_i ω_i(x) B_i A_i x with g(x) = softmax(W_g x), τ(x) = τ_max·σ(w_τ·x + b_τ) and
expert i used when g_i(x) >= τ(x) (Eq. 130-131). The router rule is lorazoo.routing's adaptive
threshold (``Router(threshold=τ_max)``); the experts are :class:`~lorazoo.forms.loramoe.ExpertMixture`'s.

Followed the authors' code (zefang-liu/AdaMoLE, src/adamole/layer.py) where the study is silent:

* The gate is ω_i = (g_i - τ)·1[g_i >= τ] / Σ_j (g_j - τ)·1[g_j >= τ] (sum 0 -> 1), not Eq. 130's
  g_i·1[g_i > τ]; the code's ``torch.ge`` makes it >=. Since max_i g_i >= 1/E > τ_max·σ(·) at the
  default τ_max = 1/E, every token uses at least one expert.
* The threshold network is nn.Linear(in, 1) with bias (Eq. 131's w_τ, b_τ), nn.Linear's init; the
  gate is nn.Linear(in, E) without bias; τ_max = ``adamole_max_threshold``, default 1/E (the code's
  default and its scripts' ``--threshold=0.125`` for 8 experts).
* Auxiliary loss: the code's Switch-style loss with the thresholded scores, E·Σ_i f_i·P_i where
  f_i is the share of tokens with g_i >= τ and P_i the mean of g_i - τ (not of g_i), weight
  ``adamole_aux_weight`` = 1e-3 (its scripts' ``aux_loss_coeff``).

``rank`` is the total over the experts (r_e = ⌈rank/E⌉, 8 experts of rank 1 at rank 8, the
study's comparison; the code gives every expert ``lora_rank``). The logits of W_g and w_τ come out
of the same matmul as A x; the variable number of experts a token uses is a mask on the gates, so
the forward is LoRA's two matmuls over E·r_e units with no loop over experts (the code loops).
"""
from __future__ import annotations

from ..parts import check_number
from ..registry import FORMS
from ..routing import switch_loss
from .loramoe import ExpertMixture


@FORMS.register("adamole", paper="AdaMoLE (Liu & Luo, 2024) [88]",
                equations="study Eq. 124, 130-131; ω_i = (g_i - τ)·1[g_i >= τ] renormalized, "
                          "τ(x) = τ_max·σ(w_τ x + b_τ), L_aux = E·Σ_i f_i·mean(g_i - τ)",
                summary="LoRA experts chosen by a learned per-token threshold (a variable number per token)")
class AdaMoLE(ExpertMixture):
    """AdaMoLE: :class:`ExpertMixture` with the adaptive-threshold router. ``top_k`` does not apply."""

    rank_bound = "E·⌈r/E⌉ per token at most (the experts above the threshold)"
    options = {"experts": 8, "adamole_max_threshold": None, "adamole_aux_weight": 1e-3}

    @classmethod
    def validate(cls, opts):
        super(ExpertMixture, cls).validate(opts)  # the plain number checks; top_k does not apply
        check_number("experts", opts["experts"], minimum=1, integer=True, maximum=256)
        t = opts["adamole_max_threshold"]
        if t is not None:
            check_number("adamole_max_threshold", t, strict=True, maximum=1.0)
        check_number("adamole_aux_weight", opts["adamole_aux_weight"])

    @classmethod
    def router_options(cls, opts):
        t = opts["adamole_max_threshold"]
        return {"threshold": 1.0 / int(opts["experts"]) if t is None else float(t)}

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        experts = int(opts["experts"])
        super().__init__(in_features, out_features, rank, scale, {**opts, "top_k": experts}, ctx)
        self.aux_weight = float(opts["adamole_aux_weight"])

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None or self.aux_weight == 0:
            return None
        return self.aux_weight * switch_loss(r)
