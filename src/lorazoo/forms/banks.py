"""Trainable banks shared across layers (RaSA's shared ranks, DenseLoRA's encoder/decoder).

A bank lives once per adapter under the first adapted layer's ``shared`` (``Form.use_bank``), so
``handle.trainable_parameters()``, optimizers, state_dict and save/load see it once, and every
layer that uses it adds its gradient to the same tensors.
"""
from __future__ import annotations

import torch
from torch import nn

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
