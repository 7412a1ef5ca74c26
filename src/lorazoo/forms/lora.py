"""LoRA and its plain-factor relatives: W' = W0 + s·B·A (LoRA Eq. 1; study Eq. 1, 134)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form
from ..registry import FORMS


@FORMS.register("lora", paper="LoRA (Hu et al., 2021)", equations="study Eq. 1, 134; h = W0 x + s·B A x",
                summary="additive low-rank update B·A, B zero at init")
class LoRA(Form):
    """h = W0 x + s·B(M ⊙ A x): A (r, in) Kaiming-uniform, B (out, r) zero, M the rank mask.

    The forward never forms B·A; cost is r·(in + out) per token on top of the base.
    """

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def factors(self):
        return self.B, self.A

    @property
    def plain_lora(self) -> bool:
        cls = type(self)
        return (cls.forward is LoRA.forward and cls.delta is LoRA.delta
                and not self.reads_output and not self.multiplicative)

    def delta(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """s·B(M ⊙ A x), the additive update applied to ``x``."""
        # s multiplies the (tokens x r) activations, not the (tokens x out) result: one pass less.
        return F.linear(self.rank_masked(F.linear(x, self.A), mask) * self.scale, self.B)

    def forward(self, x, y, weight, mask=None):
        return y + self.delta(x, mask)

    def delta_weight(self, weight):
        return (self.B @ self.A) * self.scale
