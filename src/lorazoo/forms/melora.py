"""MeLoRA: mini-ensemble low-rank adapters (Ren et al., 2024 [42]; study Eq. 14-15).

    ΔW = s·diag(B_1 A_1, ..., B_n A_n),   A_i (r, in_i), B_i (out_i, r),

n mini LoRAs on the diagonal blocks of the weight: mini LoRA i reads the i-th slice of the input
and writes the i-th slice of the output. rank(ΔW) = Σ_i rank(B_i A_i) <= n·r.

How r is split: ``rank`` is the rank r of each mini LoRA, as in the authors' code (their scripts
set ``rank = [r] * l_num`` with ``in_features //= l_num``) and as the study runs it (Sec. IV-C4:
r = 8 with 2 blocks, "an overall rank of 16"). The update then has rank up to n·r with exactly
LoRA-r's parameter count r·(in + out) (the study's r' = r case). For the other reading (same rank
as LoRA-r, n times fewer parameters) pass rank = r/n. s = alpha/r with r the mini rank, as the
authors' per-block ``lora_alpha / rank``.

Layout: A (r, in) holds the n blocks side by side, A_i = A[:, I_i]; B (out, r) stacks them,
B_i = B[O_i, :], so the tensors have LoRA's shapes. Each block is initialized like the authors'
``nn.Linear(in_i, r)``: A_i Kaiming-uniform with its own fan-in in_i (bound 1/sqrt(in_i)), B_i zero,
so ΔW = 0 at the start.

Shapes not divisible by n: handled, not refused. The input and output are cut like
``torch.tensor_split`` (the first in % n blocks one wider), so ΔW stays block diagonal with n blocks
and the bound n·r holds; the authors' code needs in and out divisible by n. The rank limit is
min(in // n, out // n) (the smallest block).

Forward: with equal blocks, x viewed as (tokens, n, in/n) meets A viewed as (r, n, in/n) in one
batched contraction, then B viewed as (n, out/n, r): 2·r·(in + out) FLOPs per token, LoRA-r's
count, never a dense or block-diagonal (out, in) matrix; unequal blocks loop over the n blocks.
The rank mask has n·r entries (``self.rank`` is n·r: every mini LoRA's rank dims), mask[i·r + k]
on rank dim k of block i.

Not a plain B·A product: inits that set LoRA factors (PiSSA, EVA, LoRA-GA) are refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_number
from ..registry import FORMS


def block_sizes(features: int, blocks: int) -> list[int]:
    """Sizes of ``blocks`` consecutive slices of ``features``, as torch.tensor_split cuts them."""
    q, rem = divmod(features, blocks)
    return [q + 1] * rem + [q] * (blocks - rem)


@FORMS.register("melora", paper="MeLoRA (Ren et al., 2024) [42]",
                equations="study Eq. 14-15: ΔW = s·⊕_i B_i A_i, n blocks of rank r; rank(ΔW) <= n·r",
                summary="n mini LoRAs on the diagonal blocks of the weight: rank n·r for LoRA-r's parameters")
class MeLoRA(Form):
    """h = W0 x + s·blockdiag_i(B_i diag(m_i) A_i) x; see the module docstring."""

    options = {"melora_blocks": 2}
    rank_bound = "n·r"

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.blocks = int(opts.get("melora_blocks", 2))
        self.block_rank = rank
        self.rank = self.blocks * rank  # the rank dimension the mask acts on: every block's
        self.in_sizes = block_sizes(in_features, self.blocks)
        self.out_sizes = block_sizes(out_features, self.blocks)
        self.even = in_features % self.blocks == 0 and out_features % self.blocks == 0
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_number("melora_blocks", opts["melora_blocks"], minimum=1, integer=True)

    @classmethod
    def max_rank(cls, in_features, out_features):
        return cls.rank_limit(in_features, out_features, {"melora_blocks": 2})

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        n = int(opts["melora_blocks"])
        return min(in_features // n, out_features // n)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for A_i in self.A.split(self.in_sizes, dim=1):
                nn.init.kaiming_uniform_(A_i, a=math.sqrt(5))  # fan-in in_i, as nn.Linear(in_i, r)
            self.B.zero_()

    def block_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if mask is None else mask.view(self.blocks, self.block_rank)

    def forward(self, x, y, weight, mask=None):
        m = self.block_mask(mask)
        n, r = self.blocks, self.block_rank
        if self.even:
            lead = x.shape[:-1]
            h = torch.einsum("...nj,rnj->...nr", x.reshape(*lead, n, -1), self.A.view(r, n, -1))
            h = h * self.scale if m is None else h * (m * self.scale)
            out = torch.einsum("...nr,nor->...no", h, self.B.view(n, -1, r))
            return y + out.reshape(*lead, self.out_features)
        parts = []
        for i, (x_i, A_i, B_i) in enumerate(zip(x.split(self.in_sizes, dim=-1), self.A.split(self.in_sizes, dim=1),
                                                self.B.split(self.out_sizes, dim=0))):
            h = F.linear(x_i, A_i) * (self.scale if m is None else m[i] * self.scale)
            parts.append(F.linear(h, B_i))
        return y + torch.cat(parts, dim=-1)

    def delta_weight(self, weight):
        blocks = [B_i @ A_i for A_i, B_i in zip(self.A.split(self.in_sizes, dim=1),
                                                self.B.split(self.out_sizes, dim=0))]
        return torch.block_diag(*blocks) * self.scale
