"""MultiLoRA (Wang et al. 2023 [93]): LoRA scaled horizontally, n parallel LoRA modules, each with a
learnable scaling factor, and an initialization that lowers the dependency between A and B.

ΔW = s·Σ_{i=1..n} λ_i B_i A_i, λ_i a learnable scalar per module. Init (the paper's change of
initialization, as we read it; we could not check its code): every A_i and B_i Kaiming-uniform as
nn.Linear's weight (so B is not zero, unlike LoRA) and every λ_i = 0, so the update starts at zero
and the model as the base; the first steps move the λ_i, then the factors.

A mixture of experts without a router: the λ_i are input-independent gates, applied to each
module's rank units with lorazoo.routing's :func:`gate_experts`, so the n modules run as LoRA's two
matmuls over n·r_e units, never a loop over modules. ``rank`` is the total over the modules,
r_e = ⌈rank/n⌉ (8 modules of rank 1 at rank 8, the study's 8-expert comparison at LoRA's
parameter count plus 8 scalars). Mergeable: ΔW = s·B diag(λ ⊗ 1_{r_e}) A.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_number
from ..registry import FORMS
from ..routing import gate_experts


@FORMS.register("multilora", paper="MultiLoRA (Wang et al., 2023) [93]",
                equations="ΔW = s·Σ_i λ_i B_i A_i, λ_i learnable, λ = 0 and A_i, B_i Kaiming-uniform at init",
                summary="n parallel LoRA modules with learnable scaling factors (horizontal scaling), "
                        "non-zero B, zero scales")
class MultiLoRA(Form):
    """n LoRA modules stored side by side, A (n·r_e, in) and B (out, n·r_e), scales λ (n,)."""

    plain_product = False  # s·B diag(λ) A: an init setting B, A alone would not set the update
    rank_bound = "n·⌈r/n⌉"
    options = {"multilora_modules": 8}

    @classmethod
    def validate(cls, opts):
        check_number("multilora_modules", opts["multilora_modules"], minimum=1, integer=True, maximum=256)

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        return int(opts["multilora_modules"]) * min(in_features, out_features)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.modules_n = int(opts["multilora_modules"])
        self.module_rank = -(-int(rank) // self.modules_n)
        self.rank = self.modules_n * self.module_rank
        self.A = nn.Parameter(torch.empty(self.rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, self.rank))
        self.scales = nn.Parameter(torch.empty(self.modules_n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # per module as nn.Linear(in, r_e): bound 1/sqrt(in)
        bound = 1 / math.sqrt(self.module_rank)            # per module as nn.Linear(r_e, out): bound 1/sqrt(r_e)
        nn.init.uniform_(self.B, -bound, bound)
        nn.init.zeros_(self.scales)

    def module(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_i, A_i): views of module i in the concatenated factors."""
        cols = slice(i * self.module_rank, (i + 1) * self.module_rank)
        return self.B[:, cols], self.A[cols]

    def forward(self, x, y, weight, mask=None):
        h = gate_experts(self.rank_masked(F.linear(x, self.A), mask), self.scales)  # λ_i on module i's units
        return y + F.linear(h * self.scale, self.B)

    def delta_weight(self, weight):
        return self.scale * (self.B * self.scales.repeat_interleave(self.module_rank)) @ self.A
