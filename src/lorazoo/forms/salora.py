"""SaLoRA's gated form (Hu et al. 2023 [56]; study Eq. 46-48): ΔW = s·B·diag(z ⊙ m)·A, z hard-concrete.

Study Eq. 47 writes the update as Σ_i min(1, max(0, d̃_i))·a_i b_iᵀ: rank i is scaled by a
hard-concrete (HC) gate z_i ∈ [0, 1] (Louizos et al. 2018) of location log d_i. Here
``log_alpha`` is log d (one trainable scalar per rank, so d > 0 always, which Eq. 46's log d needs).

- Training (Eq. 46): u ~ U(0, 1), one draw per rank per forward (shared by the batch, a structured
  gate), s = σ((log u − log(1 − u) + log α)/τ), z = min(1, max(0, s·(ζ − γ) + γ)).
- Evaluation, ``delta_weight`` and merges: Louizos' deterministic gate
  z = min(1, max(0, σ(log α)·(ζ − γ) + γ)), so a merged or saved adapter is one fixed matrix.
- Expected L0 norm (Eq. 48): E‖z‖₀ = Σ_i P(z_i > 0) = Σ_i σ(log α_i − τ·log(−γ/ζ)), over the
  active ranks. It is differentiable in log α (the unofficial code the study ran counts
  ``s·(ζ−γ)+γ > 0``, a step function whose value and gradient carry no signal; tested here).

Choices: A Kaiming-uniform and B zero as LoRA (the update starts at zero; the study's code starts
both factors orthogonal, which does not start from the base model). τ = 2/3, γ = −0.1, ζ = 1.1 are
Louizos et al.'s values, which SaLoRA adopts. log α starts at 3 (``salora_init_log_alpha``): every
gate starts open (deterministic z = 1, P(z > 0) ≈ 0.99), so training starts from full rank and the
budget term closes gates, as AdaLoRA starts from every triplet. ``rank_mask`` (saved 0/1 buffer) holds
the ranks kept when the ``salora`` schedule fixes the budget. Forward cost: LoRA's plus r gates.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import Form, check_number
from ..registry import FORMS
from ..schedules.rankalloc import masked_orthogonality


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor | None, tau: float, gamma: float,
                  zeta: float) -> torch.Tensor:
    """The HC gate of study Eq. 46-47 for noise ``u`` (None: the deterministic test-time gate)."""
    if u is None:
        s = torch.sigmoid(log_alpha)
    else:
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / tau)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


@FORMS.register("salora", paper="SaLoRA (Hu et al., 2023) [56]",
                equations="study Eq. 46-48; ΔW = s·Σ_i min(1, max(0, d̃_i))·b_i a_iᵀ, d̃ hard-concrete",
                summary="LoRA with a hard-concrete L0 gate per rank; budget by the salora schedule")
class SaLoRA(Form):
    """h = W0 x + s·B((z ⊙ m ⊙ M) ⊙ A x): z the HC gates, m the kept ranks, M DropLoRA's mask."""

    options = {"salora_temperature": 2 / 3, "salora_gamma": -0.1, "salora_zeta": 1.1,
               "salora_init_log_alpha": 3.0}
    up_params = ("B",)
    plain_product = False  # the gates sit between B and A

    @classmethod
    def validate(cls, opts):
        check_number("salora_temperature", opts["salora_temperature"], strict=True)
        check_number("salora_zeta", opts["salora_zeta"], minimum=1, strict=True)
        g = opts["salora_gamma"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g >= 0:
            raise SpecError(f"salora_gamma must be a number < 0 (the hard-concrete stretch), got {g!r}")
        check_number("salora_init_log_alpha", opts["salora_init_log_alpha"], minimum=-1e6)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.tau, self.gamma, self.zeta = (float(opts["salora_temperature"]), float(opts["salora_gamma"]),
                                           float(opts["salora_zeta"]))
        self.init_log_alpha = float(opts["salora_init_log_alpha"])
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.log_alpha = nn.Parameter(torch.empty(rank))
        self.register_buffer("rank_mask", torch.ones(rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        nn.init.constant_(self.log_alpha, self.init_log_alpha)

    def gates(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """z ⊙ m: a stochastic HC draw in training (or for the noise ``u`` given), else deterministic."""
        if u is None and self.training:
            tiny = torch.finfo(self.log_alpha.dtype).tiny
            u = torch.rand_like(self.log_alpha).clamp(tiny, 1 - 1e-7)
        return hard_concrete(self.log_alpha, u, self.tau, self.gamma, self.zeta) * self.rank_mask

    def expected_l0(self) -> torch.Tensor:
        """E‖z ⊙ m‖₀ = Σ_i m_i σ(log α_i − τ log(−γ/ζ)) (study Eq. 48), differentiable."""
        return (torch.sigmoid(self.log_alpha - self.tau * math.log(-self.gamma / self.zeta)) * self.rank_mask).sum()

    def open_probability(self) -> torch.Tensor:
        """P(z_i > 0) per rank (the terms of Eq. 48), detached: the ranking used to fix the budget."""
        return torch.sigmoid(self.log_alpha - self.tau * math.log(-self.gamma / self.zeta)).detach()

    def forward(self, x, y, weight, mask=None):
        h = self.rank_masked(F.linear(x, self.A) * (self.gates() * self.scale), mask)
        return y + F.linear(h, self.B)

    def delta_weight(self, weight):
        return (self.B * hard_concrete(self.log_alpha, None, self.tau, self.gamma, self.zeta)
                * self.rank_mask) @ self.A * self.scale

    def update_factors(self, weight):
        """(B', A') with ΔW = B'A' (the deterministic gates and s folded into B), for per-sample serving."""
        gates = hard_concrete(self.log_alpha, None, self.tau, self.gamma, self.zeta) * self.rank_mask
        return self.B * (gates * self.scale), self.A

    def orthogonality(self) -> torch.Tensor:
        """R(B, A) of study Eq. 35 over the kept ranks."""
        return masked_orthogonality(self.B, self.A, self.rank_mask)
