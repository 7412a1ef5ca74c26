"""LoRA-FA (Zhang et al., 2023 [101]; study Eq. 2-3): the down-projection A is frozen at its init.

Only B (and the form's other parameters, e.g. DoRA's magnitude m) trains; A keeps the value the
init gave it. With A frozen, B's gradient is s·g·A0ᵀ (study Eq. 2, g = ∂L/∂W̃), so plain SGD moves
the weight by exactly (study Eq. 3, written in torch's (out, in) layout)

    ΔW_t = s·B_t·A0 = −η s² Σ_{i<t} g_i A0ᵀ A0,

every update lies in the row space of A0 (rank <= r), and A needs no gradient, no optimizer state
and no stored input activation: autograd keeps only A0 x (r per token) for B's gradient, not x.

How: ``attach`` marks A of every layer ``_lorazoo_frozen`` (the flag ``activate`` honours), so A is
left out of ``trainable_parameters``/``param_groups`` (no AdamW state), of ``num_trainable`` and of
the gradient, also after ``lorazoo.load`` and re-activation. A is still saved with the adapter (it
is part of the update).

Choices: A starts as the init part makes it (LoRA's Kaiming-uniform by default; the paper draws A
at random and B = 0, so the model starts as the base); any factorized additive form works (DoRA:
B and m train, as the brief's "LoRA-FA with DoRA"; MoSLoRA: the mixer and B train). Refused: forms
without B·A factors or multiplicative ones (LoRMA: Eq. 3 does not describe them), and an init
that zeroes A (``init_b_or_a`` with ``init_b_or_a_zero="A"``), which would freeze the update at 0.
A schedule that re-initializes the factors (ReLoRA) draws a new frozen A at each restart.
"""
from __future__ import annotations

from ..errors import SpecError
from ..parts import Form, Optim
from ..registry import OPTIMS


def frozen_down_projections(handle) -> list:
    """The A factor of every layer of ``handle`` (what LoRA-FA freezes)."""
    return [ad.form.factors()[1] for ad in handle.adapters().values()]


@OPTIMS.register("lora_fa", paper="LoRA-FA (Zhang et al., 2023) [101]",
                 equations="study Eq. 2-3 context; A frozen at A0, ΔW_t = −η s² Σ g_i A0ᵀA0 under SGD",
                 summary="freeze the down-projection A; only B (and the form's other parameters) train")
class LoRAFA(Optim):
    options = {}

    @classmethod
    def check_form(cls, form_cls):
        if form_cls.factors is Form.factors or form_cls.multiplicative:
            raise SpecError(
                f"optim 'lora_fa' freezes the down-projection A of an additive update s·B·A, which form "
                f"'{form_cls.part_name}' does not have; use a factorized form such as 'lora' or 'dora', "
                f"or optim='default'")

    @classmethod
    def check_spec(cls, spec):
        if spec.init == "init_b_or_a" and spec.options.get("init_b_or_a_zero") == "A":
            raise SpecError(
                "optim 'lora_fa' freezes A, and init_b_or_a_zero='A' starts A at zero: the update would "
                "stay zero forever; use init_b_or_a_zero='B' (LoRA-FA's own init) or another optim")

    def attach(self, handle):
        for A in frozen_down_projections(handle):
            A._lorazoo_frozen = True
            A.requires_grad_(False)
            A.grad = None
