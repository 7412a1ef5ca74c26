"""GOAT's init (Fan et al., ICML 2025 [90]; study Eq. 132): expert i from the i-th SVD segment of W0,
with a residual base.

W0 (out, in) = U Σ Vᵀ (all min(out, in) triplets, in at least float32) is cut into E segments of
L = ⌊min(out, in) / E⌋ consecutive triplets; expert i takes the first r_e triplets of segment i
(indices i·L … i·L + r_e - 1):

    B_i = U_i (Σ_i / (s·ρ))^1/2,   A_i = (Σ_i / (s·ρ))^1/2 V_iᵀ,   so s·B_i A_i = U_i Σ_i V_iᵀ / ρ
    base  W_res = W0 - (s / E)·Σ_i B_i A_i        (through ``Adapter.shift_base``)

This is GOAT's code (init_type 'goat'; ``Sr /= scaling * rho``, ρ = 10; ``weight -= init_cof *
scaling * B @ A`` with init_cof = 1/E, its default). Study Eq. 132 writes the factors with 1/s
alone: ``goat_rho=1`` gives that. The 1/E is the paper's weight alignment: with top-k gates that
sum to one, each expert's gate averages 1/E under a uniform router, so the equivalent weight
W_res + s·Σ_i E[ω_i] B_i A_i is W0. The model therefore starts at the base only on average over
the routing, not token by token (``starts_as_base = False``); with a dense router whose gates are
all 1/E it starts exactly there (tested).

Works on any mixture of per-expert factors (forms 'goat', 'loramoe'). Each segment must hold r_e
triplets: r_e <= ⌊min(out, in) / E⌋, checked for every target before the model changes.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..forms.loramoe import ExpertMixture
from ..parts import Init, check_number
from ..registry import INITS
from .svd import top_svd


@INITS.register("goat", paper="GOAT (Fan et al., 2025) [90]",
                equations="study Eq. 132: B_i = U_i (Σ_i/(sρ))^1/2, A_i = (Σ_i/(sρ))^1/2 V_iᵀ from the i-th of E "
                          "SVD segments; base W0 - (s/E)·Σ_i B_i A_i",
                summary="experts from disjoint segments of W0's singular spectrum, residual base")
class GOATInit(Init):
    """SVD-segment init of a mixture's experts; the base keeps W0 - (s/E)·Σ_i B_i A_i."""

    needs_factors = False
    starts_as_base = False  # equal to the base on average over the routing (see the module docstring)
    options = {"goat_rho": 10.0}

    @classmethod
    def validate(cls, opts):
        check_number("goat_rho", opts["goat_rho"], strict=True)

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, ExpertMixture):
            raise SpecError(f"init 'goat' fills the experts of a mixture of LoRA experts, which form "
                            f"'{form_cls.part_name}' is not; use form='goat' (or 'loramoe')")

    def prepare(self, model, targets, calibration):
        from ..adapt import _shape

        E = int(self.spec.options["experts"])
        r_e = ExpertMixture.expert_rank_of(self.spec.rank, E)
        for path, mod in targets.items():
            fin, fout = _shape(mod)
            if r_e > min(fin, fout) // E:
                raise SpecError(
                    f"init 'goat' cuts the {min(fin, fout)} singular triplets of layer {path!r} ({fin} -> {fout}) "
                    f"into {E} segments of {min(fin, fout) // E}, fewer than the {r_e} each expert needs "
                    f"(rank {self.spec.rank} over {E} experts); lower rank or experts")

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        form = adapter.form
        E, r = form.experts, form.expert_rank
        n = min(weight.shape)
        U, S, V = top_svd(weight.detach(), n)
        seg = n // E
        idx = torch.cat([torch.arange(i * seg, i * seg + r) for i in range(E)]).to(S.device)
        root = (S[idx] / (form.scale * self.spec.options["goat_rho"])).sqrt()
        form.B.copy_(U[:, idx] * root)
        form.A.copy_(root[:, None] * V[:, idx].mT)
        # with the stored (rounded) factors, so base + (s/E)·Σ B_i A_i is W0 up to one rounding
        adapter.shift_base(weight, -(form.scale / E) * form.B.detach(), form.A.detach())
