"""NZLoRA: both factors start non-zero, the base is left as it is (study Eq. 89, [76]).

Li et al., "Beyond Zero Initialization: Investigating the Impact of Non-Zero Initialization on LoRA
Fine-Tuning Dynamics" (ICML 2025): drawing A and B both at random makes LoRA robust to small
learning rates, and the noise s·B0·A0 this adds to the pretrained weight does not hurt the final
result, so the pretrained weight is NOT manipulated (no W0 - s·B0·A0): the model does not start as
the base model, on purpose (``starts_as_base = False``).

    A0 ~ U(-b_A, b_A),  B0 ~ U(-b_B, b_B),  b = sqrt(gamma / m),  m = the layer's input size

with gamma_A = gamma_B = 16 as in the study's Sec. IV-C4. Choice: gamma scales the *variance*
(gamma = 1 is exactly LoRA's Kaiming-uniform bound 1/sqrt(m) for A; Var = gamma / (3m)), as the
NZLoRA paper speaks of initialization variances relative to Kaiming's and as the study's own
implementation does (hhnqqq/MyTransformers, nzlora.py: ``bound = (init_scale / in_features) ** 0.5``
for both factors). The study's Eq. 89 prints the bound as gamma / sqrt(m); with gamma = 16 that is
4x larger, and on a 4096-wide layer its s·B0·A0 would exceed the pretrained weights themselves, so we
read it as the square root above. Both bounds use the layer's input size m (also for B, as the
study's equation and code do).

Any form with plain factors (lora, dora, moslora...) works: DoRA's magnitude is taken from
W0 + s·B0·A0, so DoRA starts at that same non-base point; forms without B·A are refused.
"""
from __future__ import annotations

import math

import torch

from ..parts import Init, check_number
from ..registry import INITS
from .svd import set_factors


@INITS.register("nzlora", paper="NZLoRA: 'Beyond Zero Initialization' (Li et al., ICML 2025) [76]",
                equations="study Eq. 89: A0 ~ U(±sqrt(gamma_A/m)), B0 ~ U(±sqrt(gamma_B/m)), "
                          "m = in features; no base manipulation",
                summary="both factors random (Kaiming-uniform, variance scaled by gamma), the base "
                        "untouched: does not start as the base model")
class NZLoRA(Init):
    """NZLoRA. Options ``nzlora_gamma_a``, ``nzlora_gamma_b`` (> 0, default 16 each): the variance
    multipliers of A's and B's uniform draws relative to Kaiming's."""

    starts_as_base = False
    options = {"nzlora_gamma_a": 16.0, "nzlora_gamma_b": 16.0}

    @classmethod
    def validate(cls, opts):
        for key in cls.options:  # 0 would zero a factor: that is LoRA's default init (or a dead adapter)
            check_number(key, opts[key], strict=True)

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        B, A = adapter.form.factors()
        m = adapter.form.in_features
        b_a = math.sqrt(self.spec.options["nzlora_gamma_a"] / m)
        b_b = math.sqrt(self.spec.options["nzlora_gamma_b"] / m)
        set_factors(adapter, weight, torch.empty_like(B).uniform_(-b_b, b_b),
                    torch.empty_like(A).uniform_(-b_a, b_a), shift=False)
