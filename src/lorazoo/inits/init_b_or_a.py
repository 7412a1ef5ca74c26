"""Hayou et al. (2024) [77], "The impact of initialization on LoRA finetuning dynamics" (study
Sec. II-D1, after Eq. 88): which of the two factors starts at zero.

``init_b_or_a_zero="B"`` is the paper's Init[A] and LoRA's default: A ~ U(±1/sqrt(in)) (Kaiming
uniform with a = sqrt(5), study Eq. 88), B = 0. ``"A"`` is its Init[B], the mirror image: B ~
U(±1/sqrt(r)) (the same Kaiming-uniform rule on B, whose fan-in is r), A = 0. Either way B·A = 0,
so the model starts as the base.

The learning-rate consequence (the paper's Theorems 1-2, in its toy model f(x) = b·aᵀx the study
uses for Eq. 62-64): with B = 0 the first step moves the output by −η s²(f−y)(aᵀx)², which is
Θ(η) as the width n grows (aᵀx = Θ(1) for A ~ U(±1/sqrt(n))); with A = 0 it moves it by
−η s²(f−y) b²‖x‖², which is Θ(η·n). So the largest stable learning rate is Θ(n^-1/2) with B zero
and only Θ(n^-1) with A zero: with A zero, the learning rate must shrink with the width, and at a
shared learning rate the B-zero start learns more efficiently, which is why the paper recommends
LoRA's default. ``tests/test_init_b_or_a.py`` measures the first-step output change across widths
and checks these two growth rates.

Choices: ``"B"`` keeps the form's own draw when it already has B = 0 (LoRA, DoRA: then it is
exactly ``init="default"``) and re-draws otherwise; ``"A"`` draws B from the generator ``adapt``
seeds with the spec's seed. DoRA's m is recomputed afterwards (``after_factor_init``), so DoRA
also starts as the base. Other parameters of the form (MoSLoRA's mixer) keep their own init.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..parts import Init, check_choice
from ..registry import INITS

ZERO = ("B", "A")


@INITS.register("init_b_or_a", paper="Hayou et al., 2024 [77]",
                equations="study Eq. 88 and Sec. II-D1: Init[A] (B = 0, the default) or Init[B] (A = 0)",
                summary="choose which factor starts at zero; B zero allows a Θ(n^-1/2) learning rate, A zero "
                        "only Θ(n^-1)")
class InitBOrA(Init):
    options = {"init_b_or_a_zero": "B"}

    @classmethod
    def validate(cls, opts):
        check_choice("init_b_or_a_zero", opts["init_b_or_a_zero"], ZERO)

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        B, A = adapter.form.factors()
        if self.spec.options["init_b_or_a_zero"] == "B":
            if (B == 0).all():  # the form's own init is already LoRA's (A Kaiming, B zero): keep its draw
                return
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        else:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            nn.init.zeros_(A)
