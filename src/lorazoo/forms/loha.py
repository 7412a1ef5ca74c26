"""LoHA: Hadamard product of two low-rank products (FedPara [43], LyCORIS LoHa; study Eq. 16)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form
from ..registry import FORMS


@FORMS.register("loha", paper="FedPara (Hyeon-Woo et al., 2021) [43]; LyCORIS LoHa",
                equations="study Eq. 16: ΔW = s·(B1 A1) ⊙ (B2 A2); rank(ΔW) <= r² (study Eq. 6)",
                summary="Hadamard product of two rank-r products, run as a rank-r² Khatri-Rao LoRA")
class LoHA(Form):
    """h = W0 x + s·((B1 A1) ⊙ (B2 A2)) x, A_k (r, in), B_k (out, r), s = alpha/r (study Eq. 16).

    Forward without the (out, in) update: (B1A1) ⊙ (B2A2) = B'A' with the row-wise Khatri-Rao
    factors B'[:, (i,j)] = B1[:, i]·B2[:, j] (out, r²) and A'[(i,j), :] = A1[i, :]·A2[j, :]
    (r², in), so the update runs as a LoRA of rank r² at cost r²·(in + out) per token.

    Init as PEFT's LoHa (He init of FedPara, one factor zero so ΔW = 0): B1, A1, B2
    Kaiming-uniform, A2 zero. (LyCORIS zeroes B2 instead, with normal inits; either is zero.)

    Rank mask (DropLoRA): the same mask m on both branches' rank dims,
    (B1 diag(m) A1) ⊙ (B2 diag(m) A2), i.e. m_i·m_j on the Khatri-Rao dim (i, j).
    """

    rank_bound = "r^2"

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.A1 = nn.Parameter(torch.empty(rank, in_features))
        self.B1 = nn.Parameter(torch.empty(out_features, rank))
        self.A2 = nn.Parameter(torch.empty(rank, in_features))
        self.B2 = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.B1, self.A1, self.B2):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.A2)

    def khatri_rao(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') of shapes (out, r²), (r², in) with B'A' = (B1A1) ⊙ (B2A2); index (i, j) -> i·r + j."""
        r = self.rank
        B = (self.B1[:, :, None] * self.B2[:, None, :]).reshape(self.out_features, r * r)
        A = (self.A1[:, None, :] * self.A2[None, :, :]).reshape(r * r, self.in_features)
        return B, A

    def forward(self, x, y, weight, mask=None):
        B, A = self.khatri_rao()
        pair_mask = None if mask is None else (mask[:, None] * mask[None, :]).reshape(-1)
        return y + F.linear(self.rank_masked(F.linear(x, A), pair_mask) * self.scale, B)

    def delta_weight(self, weight):
        return (self.B1 @ self.A1) * (self.B2 @ self.A2) * self.scale

    def update_factors(self, weight):
        """Khatri-Rao: (B1 A1) ⊙ (B2 A2) = (B1 ⊙_row B2)(A1 ⊙_col A2), rank r1·r2."""
        B = (self.B1[:, :, None] * self.B2[:, None, :]).flatten(1) * self.scale
        A = (self.A1[:, None, :] * self.A2[None, :, :]).flatten(0, 1)
        return B, A
