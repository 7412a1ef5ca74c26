"""SORSA init (Cao, 2024 [81]; study Eq. 96-97): the principal singular triplets of W0 become the
trainable SVD-form adapter, the rest stays as the frozen residual.

With W0 (out, in) = U S Vᵀ and the r largest singular values, on the SVD form
ΔW = s·P·diag(λ)·Q (form ``adalora``, which has no masking without its schedule):

    P = U_r,  Q = V_rᵀ,  λ = S_r / s,   W_res = W0 − s·P·diag(λ)·Q = U_[r:] S_[r:] V_[r:]ᵀ   (Eq. 96-97)

so W0 = W_res + W_p and the model starts as the base. The study writes Eq. 96 in the transposed
layout (A on the input side) and with D_0 = S[r:, r:], a typo for the principal block S[:r, :r]
the authors' code uses (``sorsa_init``: ``sorsa_S = s[:r]``). λ = S_r / s makes the adapter hold
exactly W_p whatever the scale (the authors' code has s = 1 by default and then λ = S_r too; with
alpha set it keeps λ = S_r and subtracts s·W_p, so its residual is not the SVD residual): with the
rsLoRA scale (``scale="rslora"``) the split is the same. The SVD runs in at least float32 (exact,
``torch.linalg.svd``, as the authors'); the shift uses the stored (rounded) factors, so base +
adapter is W0 up to one rounding. The orthonormal regularizer (Eq. 98) is the ``sorsa`` schedule.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..forms.adalora import AdaLoRA
from ..parts import Init
from ..registry import INITS
from .svd import top_svd


def check_svd_form(form_cls, what: str) -> None:
    if not issubclass(form_cls, AdaLoRA):
        raise SpecError(f"{what} needs the SVD form P·diag(λ)·Q (form='adalora'); form '{form_cls.part_name}' "
                        f"is not one")


@INITS.register("sorsa", paper="SORSA (Cao, 2024) [81]",
                equations="study Eq. 96-97: P = U_r, λ = S_r / s, Q = V_rᵀ, W_res = W0 − U_r S_r V_rᵀ",
                summary="principal singular triplets of W0 as a trainable SVD-form adapter, residual base")
class SORSAInit(Init):
    needs_factors = False

    @classmethod
    def check_form(cls, form_cls):
        check_svd_form(form_cls, "init 'sorsa'")

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        form = adapter.form
        U, S, V = top_svd(weight.detach(), form.rank)
        form.P.copy_(U)
        form.Q.copy_(V.T)
        form.lam.copy_(S / form.scale)
        adapter.shift_base(weight, -form.scale * (form.P * form.lam).detach(), form.Q.detach())
