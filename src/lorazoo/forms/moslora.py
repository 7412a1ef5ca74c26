"""MoSLoRA: a trainable r x r mixer between LoRA's A and B (Wu et al., 2024 [92])."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import check_choice
from .lora import LoRA
from ..registry import FORMS

MIXER_INITS = ("kaiming", "orthogonal")


@FORMS.register("moslora", paper="MoSLoRA (Wu et al., 2024, 'Mixture-of-Subspaces in LoRA') [92]",
                equations="ΔW = s·B M A, M (r, r) trainable (MoSLoRA Sec. 3; study Sec. II-E3)",
                summary="LoRA with a trainable r x r subspace mixer M; B zero at init")
class MoSLoRA(LoRA):
    """h = W0 x + s·B M (m ⊙ A x): LoRA's A (Kaiming-uniform) and B (zero) with a mixer M (r, r).

    M is initialized as in the authors' code (``lora_AB``, an ``nn.Linear(r, r)``): Kaiming-uniform
    with a = sqrt(5) by default, or orthogonal (``moslora_mixer_init="orthogonal"``, the paper's
    other option). B = 0 keeps ΔW = 0 at init. The rank mask acts on A x, before the mixer.

    Factor inits (PiSSA, LoRA-GA...): :meth:`factors` gives (B, A); :meth:`after_factor_init`
    (run after every init) sets M = I when the init left B nonzero, so the update is exactly the
    s·B·A the init chose; with B still zero (the default init, EVA) the update is zero whatever M
    is, and M keeps the paper's init. The plain product B·A equals the update only while M = I;
    code that folds the update into the base later must use :meth:`delta_weight`, not B·A.
    """

    plain_product = False  # the update is s·B·M·A: LoRA-Pro and ReLoRA refuse it

    options = {"moslora_mixer_init": "kaiming"}

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.mixer_init = opts.get("moslora_mixer_init", "kaiming")
        self.M = nn.Parameter(torch.empty(rank, rank))
        self.reset_mixer()

    @classmethod
    def validate(cls, opts):
        check_choice("moslora_mixer_init", opts["moslora_mixer_init"], MIXER_INITS)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "M" in self._parameters:  # LoRA.__init__ calls this before M exists
            self.reset_mixer()

    @torch.no_grad()
    def reset_mixer(self) -> None:
        if self.mixer_init == "orthogonal":
            nn.init.orthogonal_(self.M)
        else:
            nn.init.kaiming_uniform_(self.M, a=math.sqrt(5))

    @torch.no_grad()
    def after_factor_init(self, weight):
        if self.B.any() and not getattr(self, "mixer_from_init", False):
            # the init chose a nonzero update s·B·A: keep it exact with M = I (an init that sets M
            # itself, NLoRA, marks it with ``mixer_from_init``)
            self.M.copy_(torch.eye(self.rank, dtype=self.M.dtype, device=self.M.device))

    def delta(self, x, mask):
        return F.linear(F.linear(self.rank_masked(F.linear(x, self.A), mask), self.M) * self.scale, self.B)

    def delta_weight(self, weight):
        return (self.B @ self.M @ self.A) * self.scale

    def update_factors(self, weight):
        return (self.B @ self.M) * self.scale, self.A
