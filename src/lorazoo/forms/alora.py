"""ALoRA's gated form (Liu et al. 2024 [60]; study Eq. 50): ΔW = s·B·G·A, G = diag(α), α_i ∈ {0, 1}.

ALoRA (NAACL 2024, "Allocating Low-Rank Adaptation for Fine-tuning Large Language Models"; the
study gives only Eq. 50) puts a gate unit α_i on each LoRA rank, 1 at initialization; pruning a
rank sets its gate to 0 and the freed budget becomes new ranks in other modules. The gates are not
trained: they are the saved 0/1 ``rank_mask`` buffer, which the ``alora`` schedule rewrites.

To let a layer gain ranks without changing shapes, the form is pre-allocated to ``rank`` slots of
which the first ``alora_init_rank`` (default half the rank) are active at the start; the others
are masked (no gradient reaches them) until the schedule gives them to the layer. A Kaiming-uniform,
B zero as LoRA, so the update starts at zero and a newly given rank (B column re-zeroed) adds
nothing until it trains. Forward cost: LoRA at the pre-allocated rank (r·(in + out) per token; the
preset's 16 slots for a budget of 8, so LoRA-16's step, a few percent of the base's at r ≪ d).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_number
from ..registry import FORMS


def initial_rank(opts: dict, rank: int) -> int:
    return min(rank, opts["alora_init_rank"] or max(1, rank // 2))


@FORMS.register("alora", paper="ALoRA (Liu et al., 2024) [60]",
                equations="study Eq. 50 (ranks by ablation); ΔW = s·B·diag(α)·A, α_i ∈ {0, 1}",
                summary="LoRA with a 0/1 gate per rank, pre-allocated slots; ranks moved by the alora schedule")
class ALoRA(Form):
    """h = W0 x + s·B((α ⊙ M) ⊙ A x): α the 0/1 gates (``rank_mask``), M DropLoRA's mask."""

    options = {"alora_init_rank": None}
    up_params = ("B",)
    plain_product = False  # the gates sit between B and A

    @classmethod
    def validate(cls, opts):
        if opts["alora_init_rank"] is not None:
            check_number("alora_init_rank", opts["alora_init_rank"], minimum=1, integer=True)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self._init_rank = initial_rank(opts, rank)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.register_buffer("rank_mask", torch.zeros(rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        self.rank_mask.zero_()
        self.rank_mask[: self._init_rank] = 1.0

    def forward(self, x, y, weight, mask=None):
        h = self.rank_masked(F.linear(x, self.A) * (self.rank_mask * self.scale), mask)
        return y + F.linear(h, self.B)

    def delta_weight(self, weight):
        return (self.B * self.rank_mask) @ self.A * self.scale

    def update_factors(self, weight):
        """(B', A') with ΔW = B'A' (gates and s folded into B), for per-sample serving."""
        return self.B * (self.rank_mask * self.scale), self.A
