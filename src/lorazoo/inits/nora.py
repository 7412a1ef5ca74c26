"""NoRA's init (Lin et al., 2024 [79]; authors' code lliai/LoRA-Zoo, NoRALinear_C, init_method '1').

For the form ``nora`` (forms/nora.py, which has the sources and the choices): with W0 = U S Vᵀ the
frozen outer pair is U_R S_R (out, R) and V_Rᵀ (R, in); the inner pair starts as LoRA (A_i
Kaiming-uniform, B_i zero), so ΔW = 0 and the base is left as it is: the model starts as the base.
The form's default init computes the same outer pair (``after_factor_init``); this part names
NoRA's init axis in the catalogue and refuses other forms. The authors' activation scaling of W0
(ASVD, from calibration data) is left out (forms/nora.py).
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..parts import Init
from ..registry import INITS


@INITS.register("nora", paper="NoRA (Lin et al., 2024) [79]",
                equations="W0 = U S Vᵀ: frozen outer U_R S_R, V_Rᵀ; inner A_i Kaiming, B_i = 0; base unchanged",
                summary="NoRA's SVD init: frozen outer pair from the top-R singular triplets of W0, inner LoRA "
                "from zero")
class NoRAInit(Init):
    needs_factors = False

    @classmethod
    def check_form(cls, form_cls):
        if form_cls.part_name != "nora":
            raise SpecError(f"init 'nora' initializes the nested pairs of form 'nora'; form "
                            f"'{form_cls.part_name}' has none (use form='nora', or init='pissa' for plain factors)")

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        form = adapter.form
        form.set_outer(weight)  # the inner pair keeps the form's LoRA start (A_i Kaiming, B_i = 0)
