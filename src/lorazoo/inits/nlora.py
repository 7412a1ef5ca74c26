"""NLoRA (Guo, Chang & Wu, 2025 [80]): Nyström-initialized SLoRA, the three-matrix update s·B·N·A.

SLoRA is LoRA with an r x r intermediate matrix, lorazoo's ``moslora`` form (ΔW = s·B·M·A, M the
paper's N). The Nyström method approximates W0 from r of its columns and rows,
W0 ≈ C·W_IJ⁺·R with C = W0[:, J], R = W0[I, :], W_IJ = W0[I, J]; NLoRA starts the three factors from
these pieces, with I = J = the first r indices as the authors' code (``nlora_init`` in their PEFT
fork, also the study's ``LinearWithNLoRA``):

    A = W0[:r, :],   B = W0[:, :r],   N = W0[:r, :r]          (``nlora_mixer="block"``, default)
    N = W0[:r, :r]⁺                                          (``nlora_mixer="pinv"``: the Nyström
                                                              approximation proper, B·N·A = C·W_IJ⁺·R)

The authors' code uses the block itself (its pseudo-inverse line is commented out), and so does
the preset. Neither the code nor the study moves anything out of the base, so the model does not
start as the base (``starts_as_base = False``, as NZLoRA): the start adds s·B·N·A.
``nlora_shift_base=True`` subtracts it from the base instead (through the adapter's base shift, a
PiSSA-like residual), which starts exactly at the base; off by default, as the authors.
Rows and columns beyond the weight's shape are refused by the rank check (r <= min(out, in)).
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..forms.moslora import MoSLoRA
from ..parts import Init, check_choice
from ..registry import INITS

MIXERS = ("block", "pinv")


@INITS.register("nlora", paper="NLoRA (Guo, Chang & Wu, 2025) [80]",
                equations="NLoRA Sec. 3 (Nyström W ≈ C W_IJ⁺ R); authors' code: A = W[:r,:], B = W[:,:r], "
                          "N = W[:r,:r]",
                summary="SLoRA (B·N·A) started from the first r rows, columns and their block of W0")
class NLoRAInit(Init):
    needs_factors = False
    starts_as_base = False
    options = {"nlora_mixer": "block", "nlora_shift_base": False}

    @classmethod
    def validate(cls, opts):
        check_choice("nlora_mixer", opts["nlora_mixer"], MIXERS)
        if not isinstance(opts["nlora_shift_base"], bool):
            raise SpecError(f"nlora_shift_base must be True or False, got {opts['nlora_shift_base']!r}")

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, MoSLoRA):
            raise SpecError(f"init 'nlora' starts the three factors B·N·A of SLoRA, form='moslora'; form "
                            f"'{form_cls.part_name}' has no r x r intermediate matrix")

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        form, r = adapter.form, adapter.form.rank
        W = weight.detach()
        block = W[:r, :r]
        if self.spec.options["nlora_mixer"] == "pinv":
            block = torch.linalg.pinv(block.to(torch.promote_types(block.dtype, torch.float32))).to(W.dtype)
        form.A.copy_(W[:r, :])
        form.B.copy_(W[:, :r])
        form.M.copy_(block)
        form.mixer_from_init = True  # moslora's after_factor_init keeps this M
        if self.spec.options["nlora_shift_base"]:
            adapter.shift_base(weight, -form.scale * (form.B @ form.M).detach(), form.A.detach())
