"""AutoLoRA's form: LoRA whose rank-1 components are weighted by selection variables (ref [58]).

Zhang et al., "AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank Adaptation Based on Meta
Learning" (NAACL 2024); official code ruz048/AutoLoRA (``finetune/peft/tuners/lora.py``). The study
only names it. The update is a weighted sum of rank-1 matrices,

    ΔW = s · Σ_j g_j · b_j a_jᵀ = s · B diag(g) A,

with, during the search phase, g = softmax(z) over the layer's r selection logits z (the code's
``softmax(self.a)``, z initialized to 0 so g = 1/r), and after the search g = m, the saved 0/1
``rank_mask`` of the ranks whose selection variable passed the threshold (schedule ``autolora``).
The buffer ``autolora_search`` (1 during the search, 0 after) says which, and is saved, so a saved
adapter reproduces either phase.

The logits z are trained only by the schedule's meta step on validation batches, never by the
training loss: they are marked ``_lorazoo_frozen`` (no ``requires_grad`` in training, no state in the
training optimizer), as LoRA-FA's frozen A; the schedule differentiates the validation loss with
respect to them itself.

A Kaiming-uniform, B zero (the code's PEFT LoRA init): the model starts as the base model. Not a
plain B·A product (g sits between them): factor-setting inits are refused, as for SoRA. The forward
is LoRA's two thin matmuls plus r multiplications per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form
from ..registry import FORMS


@FORMS.register("autolora", paper="AutoLoRA (Zhang et al., NAACL 2024) [58]",
                equations="ΔW = s·Σ_j g_j b_j a_jᵀ; g = softmax(z) while searching, the thresholded 0/1 mask after",
                summary="LoRA with a selection variable per rank-1 component (meta-learned by the autolora schedule)")
class AutoLoRA(Form):
    """h = W0 x + s·B(g ⊙ M ⊙ A x): g the selection (softmax(z) or the kept-rank mask), M DropLoRA's mask."""

    up_params = ("B",)
    plain_product = False

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.logits = nn.Parameter(torch.zeros(rank))
        self.logits._lorazoo_frozen = True  # trained by the schedule's meta step only
        self.register_buffer("rank_mask", torch.ones(rank))
        self.register_buffer("autolora_search", torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        with torch.no_grad():
            self.logits.zero_()
            self.rank_mask.fill_(1.0)
            self.autolora_search.fill_(1.0)

    def selection(self) -> torch.Tensor:
        """g: softmax(z) while searching (times the mask, all ones then), the 0/1 mask afterwards."""
        soft = torch.softmax(self.logits, dim=0)
        s = self.autolora_search.to(soft.dtype)
        return (s * soft + (1 - s)) * self.rank_mask

    def forward(self, x, y, weight, mask=None):
        h = self.rank_masked(F.linear(x, self.A) * (self.selection() * self.scale), mask)
        return y + F.linear(h, self.B)

    def delta_weight(self, weight):
        return (self.B * self.selection()) @ self.A * self.scale

    def update_factors(self, weight):
        return self.B * (self.selection() * self.scale), self.A
