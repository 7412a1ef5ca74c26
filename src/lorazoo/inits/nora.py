"""NoRA's init (Lin et al., 2024 [79]): outer pair and inner LoRA from the SVD of W0, base shifted.

For the form ``nora`` (forms/nora.py, which has the sources and the choices): with W0 = U S Vᵀ,
the outer pair is U_r, V_rᵀ (frozen), the inner pair holds the top r' singular values,
B_i = [diag sqrt(S_r'/s); 0] (r, r'), A_i = [diag sqrt(S_r'/s), 0] (r', r), so s·ΔW = U_r' S_r' V_r'ᵀ,
and that part is moved out of the base (W0 - U_r' S_r' V_r'ᵀ): the model starts as the base.
The 1/s inside the root is PiSSA's (inits/svd.py): s·ΔW, not ΔW, is the principal part.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..parts import Init
from ..registry import INITS


@INITS.register("nora", paper="NoRA (Lin et al., 2024) [79]",
                equations="W0 = U S Vᵀ: outer U_r, V_rᵀ; inner B_i = [diag sqrt(S_r'/s); 0], A_i = [diag sqrt(S_r'/s), 0]; "
                "base W0 - U_r' S_r' V_r'ᵀ",
                summary="NoRA's SVD init: frozen outer singular vectors, inner LoRA on the top r' singular values, "
                "base shifted")
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
        S = form.set_outer(weight)
        inner = form.rank
        root = (S[:inner] / form.scale).sqrt()
        form.B_inner.zero_()
        form.A_inner.zero_()
        form.B_inner[:inner].copy_(torch.diag(root))
        form.A_inner[:, :inner].copy_(torch.diag(root))
        # s·U_r B_i A_i V_rᵀ, with the stored (rounded) tensors, moved out of the base
        adapter.shift_base(weight, -form.scale * (form.U @ form.B_inner), form.A_inner @ form.Vt)
