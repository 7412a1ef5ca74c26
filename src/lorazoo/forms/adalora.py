"""AdaLoRA's SVD-like form (Zhang et al. 2023 [22]; study Eq. 35-45): W' = W0 + s·P·diag(λ ⊙ m)·Q.

The budget masking and the orthogonality regularizer live in the ``adalora`` schedule
(``schedules/adalora.py``); without it this is a plain SVD-form adapter with every triplet kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import whole
from ..parts import Form
from ..registry import FORMS


@FORMS.register("adalora", paper="AdaLoRA (Zhang et al., 2023) [22]",
                equations="study Eq. 35-45; ΔW = s·P·Λ·Q = s·Σ_i λ_i p_i q_iᵀ",
                summary="SVD-like update P·diag(λ)·Q, λ zero at init; triplets masked by the adalora schedule")
class AdaLoRA(Form):
    """h = W0 x + s·P((λ ⊙ m ⊙ M) ⊙ Q x) (study Eq. 45 with Λ = diag(λ)).

    P (out, r) and Q (r, in) simulate the singular vectors, λ (r,) the singular values. As in the
    paper and the authors' code, λ starts at zero (zero update) and P, Q ~ N(0, 0.02²); ``s`` comes
    from the scale part: the ``adalora`` preset uses scale "adalora", alpha/(r + 1e-5), the authors'
    ``scaling / (ranknum + 1e-5)`` (as PEFT). ``rank_mask`` m (a saved 0/1 buffer, all ones until
    the schedule prunes) holds the triplets kept by the budget; M is DropLoRA's mask. The forward
    never forms P·Λ·Q: its cost is r·(in + out) per token, as LoRA's.
    """

    up_params = ("P",)  # the up-projection, for LoRA+

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.P = nn.Parameter(torch.empty(out_features, rank))
        self.lam = nn.Parameter(torch.empty(rank))
        self.Q = nn.Parameter(torch.empty(rank, in_features))
        self.register_buffer("rank_mask", torch.ones(rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.P, mean=0.0, std=0.02)
        nn.init.normal_(self.Q, mean=0.0, std=0.02)
        nn.init.zeros_(self.lam)

    def singular_values(self) -> torch.Tensor:
        """λ ⊙ m: the singular values in use (pruned triplets read as zero)."""
        return self.lam * self.rank_mask

    def forward(self, x, y, weight, mask=None):
        h = self.rank_masked(F.linear(x, self.Q) * (self.singular_values() * self.scale), mask)
        return y + F.linear(h, self.P)

    def delta_weight(self, weight):
        return (self.P * self.singular_values()) @ self.Q * self.scale

    def update_factors(self, weight):
        return self.P * (self.singular_values() * self.scale), self.Q

    def orthogonality_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖PᵀP − I‖²_F, ‖QQᵀ − I‖²_F), differentiable. Under FSDP2 (outside the forward P and Q
        are sharded) on the gathered whole factors, so every rank computes one process's value and
        gradient (the gather's backward hands each rank its shard of it)."""
        P, Q = whole(self.P), whole(self.Q)
        eye = torch.eye(self.rank, device=P.device, dtype=P.dtype)
        return (P.T @ P - eye).square().sum(), (Q @ Q.T - eye).square().sum()

    def orthogonality(self) -> torch.Tensor:
        """R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (study Eq. 35), differentiable."""
        p, q = self.orthogonality_terms()
        return p + q
