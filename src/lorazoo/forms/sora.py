"""SoRA's gated form (Ding et al. 2023 [57]): ΔW = s·B·diag(g ⊙ m)·A, a sparse gate g between A and B.

SoRA (EMNLP 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models"; the study only names
it) trains a LoRA of a large rank r_max with a gate vector g (r,) between the down- and
up-projection: h = W0 x + s·B(g ⊙ A x) (paper Eq. 3). The ``sora`` schedule sparsifies g by a
proximal gradient step after each optimizer step (soft-thresholding, paper Eq. 4-5); the ranks whose
gate reaches zero are pruned and recorded in the saved 0/1 ``rank_mask`` buffer (m above), so they
stay zero and out of the forward.

Choices (the authors' code, TsinghuaC3I/SoRA ``src/lora.py``): A Kaiming-uniform (a = sqrt 5), B zero,
so the update starts at zero; g ~ N(0, 1) (``torch.randn(1, r)`` there). The forward never forms
B·diag(g)·A: its cost is LoRA's plus r multiplications per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form
from ..registry import FORMS


@FORMS.register("sora", paper="SoRA (Ding et al., 2023) [57]",
                equations="SoRA Eq. 3: h = W0 x + s·B(g ⊙ A x); g sparsified by the sora schedule",
                summary="LoRA with a gate vector between A and B, made sparse by proximal steps")
class SoRA(Form):
    """h = W0 x + s·B((g ⊙ m ⊙ M) ⊙ A x): g the gate, m the unpruned ranks, M DropLoRA's mask."""

    up_params = ("B",)
    plain_product = False  # the gate sits between B and A

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.gate = nn.Parameter(torch.empty(rank))
        self.register_buffer("rank_mask", torch.ones(rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        nn.init.normal_(self.gate)
        self.rank_mask.fill_(1.0)

    def gates(self) -> torch.Tensor:
        """g ⊙ m: the gate in use (pruned ranks read as zero)."""
        return self.gate * self.rank_mask

    def forward(self, x, y, weight, mask=None):
        h = self.rank_masked(F.linear(x, self.A) * (self.gates() * self.scale), mask)
        return y + F.linear(h, self.B)

    def delta_weight(self, weight):
        return (self.B * self.gates()) @ self.A * self.scale

    def update_factors(self, weight):
        """(B', A') with ΔW = B'A' (gate and s folded into B), for per-sample serving."""
        return self.B * (self.gates() * self.scale), self.A
