"""LoRA-SB's form (Ponkshe et al., 2024 [131]; study Sec. II-D2, the Eq. 97 form): ΔW = s·B·R·A with
B and A frozen and only the r x r core R trained (the LoRA-XS architecture LoRA-SB builds on).

It is ``moslora``'s B·M·A (M is R) with A and B marked ``_lorazoo_frozen`` at construction, so they
have no gradient, no optimizer state and stay frozen after ``lorazoo.load`` and re-activation; they
are still saved (they are part of the update). Trainable parameters: r² per layer.
A frozen B = 0 would keep the update at zero forever, so inits that leave B zero (``default``,
``init_b_or_a``) are refused; the paper's init is ``lora_sb`` (gradient SVD), and factor inits
that set B (PiSSA, LoRA-GA, ...) give LoRA-XS-like starts with R = I.
"""
from __future__ import annotations

from ..errors import SpecError
from ..registry import FORMS
from .moslora import MoSLoRA

ZERO_B_INITS = ("default", "init_b_or_a", "eva")


@FORMS.register("lora_sb", paper="LoRA-SB (Ponkshe et al., 2024) [131]",
                equations="study Eq. 97 with A, B frozen: ΔW = s·B·R·A, only R (r x r) trains",
                summary="frozen B and A (from the gradient SVD of init 'lora_sb'), trainable r x r core")
class LoRASB(MoSLoRA):
    options = {}

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, {"moslora_mixer_init": "kaiming", **opts}, ctx)
        for p in (self.A, self.B):
            p._lorazoo_frozen = True
            p.requires_grad_(False)

    @classmethod
    def validate(cls, opts):
        pass

    @classmethod
    def check_spec(cls, spec):
        if spec.form == cls.part_name and spec.init in ZERO_B_INITS:
            raise SpecError(
                f"form 'lora_sb' freezes B and A, and init '{spec.init}' starts B at zero: the update would stay "
                f"zero; use init='lora_sb' (its paper's gradient-SVD init) or a factor init such as 'pissa'")
