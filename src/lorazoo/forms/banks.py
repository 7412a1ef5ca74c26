"""Trainable banks shared across layers (RaSA's shared ranks, DenseLoRA's encoder/decoder), and
:class:`AssembledPair`, the forms whose B and A are assembled from shared or tied tensors.

A bank lives once per adapter under the first adapted layer's ``shared`` (``Form.use_bank``), so
``handle.trainable_parameters()``, optimizers, state_dict and save/load see it once, and every
layer that uses it adds its gradient to the same tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form
from .lora import LoRA


class SharedPair(nn.Module):
    """A trainable pair A (rank, in), B (out, rank) shared by the layers of one module type.

    Initialized as LoRA's own factors (A Kaiming-uniform with a = sqrt(5), B zero), as RaSA's and
    DenseLoRA's authors do for their shared matrices; drawn from the global generator, which
    ``adapt`` seeds with the spec's seed.
    """

    def __init__(self, rank: int, in_features: int, out_features: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        LoRA.reset_parameters(self)


class AssembledPair(Form):
    """A form whose update is LoRA's s·B diag(m) A, with (B, A) assembled each forward by :meth:`pair`
    from shared or tied tensors (ShareLoRA's banks, VB-LoRA's vector bank, PRoLoRA's rolled chunks);
    gradients reach those tensors through the assembly. Per-sample serving gets the assembled factors."""

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in)) for this layer."""
        raise NotImplementedError

    def forward(self, x, y, weight, mask=None):
        B, A = self.pair()
        return y + F.linear(self.rank_masked(F.linear(x, A), mask) * self.scale, B)

    def delta_weight(self, weight):
        B, A = self.pair()
        return (B @ A) * self.scale

    def update_factors(self, weight):
        B, A = self.pair()
        return B * self.scale, A
