"""DeLoRA: decoupled low-rank adaptation (Bini et al., ICLR 2025 [68]; study Eq. 69-70).

    ΔW = (λ/r)·B Ξ A·Σ_W  −  (λ/r)·B0 Ξ0 A0·Σ_W,     Ξ = diag(1 / (‖b_i‖ ‖a_i‖)),

with b_i the columns of B (out, r), a_i the rows of A (r, in), λ a trainable scalar and
Σ_W = diag(‖w_1‖, ..., ‖w_in‖) the norms of the columns of the frozen weight W0 (out, in).

Each normalized rank-one term b_i a_iᵀ / (‖b_i‖ ‖a_i‖) has unit Frobenius and spectral norm, so the
trained term obeys the paper's bound (study Eq. 70), in both norms:

    ‖(λ/r)·B Ξ A·Σ_W‖ <= (λ/r)·‖B Ξ A‖_2·‖Σ_W‖ <= λ·‖Σ_W‖,
    ‖Σ_W‖_2 = max_j ‖w_j‖ <= ‖W0‖_2,   ‖Σ_W‖_F = ‖W0‖_F.

Choices, from the authors' code (ExplainableML/DeLoRA, ``peft/tuners/delora.py``), where the
study's Eq. 69 writes a scalar ‖W̃‖_2:

- ‖W0‖ is the per-input-column norm Σ_W (the code's ``weight.norm(dim=0)`` scaling the columns of
  the update; the paper's "weight-norm scaling"). It is taken once, from the weight the layer has
  when the adapter is built, and kept as a buffer, so merge/unmerge are exact and save/load keep it
  (the authors' code re-reads the frozen weight each forward, which is the same number).
- Start: A and B Kaiming-uniform (the study's Sec. IV-C4 and the code), and ΔW = 0 through a frozen
  copy (A0, B0) of the initial factors whose normalized term is subtracted *inside* the update,
  scaled by the same trainable λ, exactly as the code's ``frozen_C``/``frozen_D``. So λ gets no
  gradient until B or A moved, the update has rank <= 2r, and the whole update is bounded by
  2λ·‖Σ_W‖. (PEFT's port, ``use_residual_init``, and the ``LinearWithDELoRA`` of the
  ``common/lora_modules`` code base, which looks like the study's, instead subtract the initial
  update, λ fixed at its start value, from the frozen base weight: the model starts at the base too,
  but λ gets a gradient from the first step and the adapter's own term alone obeys λ‖W0‖. That
  variant needs a form hook to shift the base from the default init; it is not offered here.)
- λ starts at ``delora_lambda`` (8, the study's Sec. IV-C4 value); the spec's ``alpha`` is not used
  and the scale part must be 'lora' (DeLoRA fixes its own λ‖W0‖/r: rsLoRA's or a constant scale
  would void the bound).
- Norms are taken in >= float32 and clamped at 1e-12 (as PEFT), so a zero column never divides by 0.

Forward, never the (out, in) update: with Σ_W folded into the rows of [A; A0] (2r x in, per step),
h = [A; A0]·Σ_W x (tokens x 2r), times the coefficients [λ/r·ξ, −λ/r·ξ0] and the rank mask on both
halves, then [B, B0] h: one rank-2r LoRA, 4·r·(in + out) FLOPs per token (LoRA-r: 2·r·(in + out)).

Not a plain B·A product: inits that set LoRA factors (PiSSA, EVA, LoRA-GA), LoRA-Pro and ReLoRA are
refused. LoRA+ works (B and λ go to its fast group).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import Form, check_number
from ..registry import FORMS
from .lora import LoRA

NORM_FLOOR = 1e-12


@FORMS.register("delora", paper="DeLoRA (Bini et al., 2025) [68]",
                equations="study Eq. 69-70: ΔW = (λ‖W0‖/r)·B Ξ A, Ξ = diag(1/(‖b_i‖‖a_i‖)); "
                          "‖ΔW‖ <= λ‖W0‖",
                summary="normalized rank-one terms with a trainable strength λ, scaled by the weight's "
                        "column norms")
class DeLoRA(LoRA):
    """h = W0 x + (λ/r)·([B, B0] diag([ξ, −ξ0] ⊙ [m, m]) [A; A0]) Σ_W x; see the module docstring."""

    options = {"delora_lambda": 8.0}
    rank_bound = "2r"  # the trained term's r, minus the frozen initial term's r
    plain_product = False
    factors = Form.factors  # B, A are normalized per rank-one term: no plain additive factors

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.lambda_init = float(opts.get("delora_lambda", 8.0))
        self.lam = nn.Parameter(torch.empty(1))
        self.register_buffer("A0", torch.empty(rank, in_features))
        self.register_buffer("B0", torch.empty(out_features, rank))
        self.register_buffer("w_norm", torch.ones(in_features))  # Σ_W; after_factor_init sets it
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_number("delora_lambda", opts["delora_lambda"], strict=True)

    @classmethod
    def check_spec(cls, spec):
        if spec.scale != "lora":
            raise SpecError(
                f"form 'delora' sets its own scale λ·‖W0‖/r (study Eq. 69; λ = delora_lambda), on which its "
                f"norm bound (Eq. 70) rests; scale={spec.scale!r} does not apply: use scale='lora' "
                f"(alpha is not used by delora)")

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        if "lam" in self._parameters:  # LoRA.__init__ calls this before lam and the copies exist
            with torch.no_grad():
                self.lam.fill_(self.lambda_init)
                self.A0.copy_(self.A)
                self.B0.copy_(self.B)

    @torch.no_grad()
    def after_factor_init(self, weight):
        acc = torch.promote_types(weight.dtype, torch.float32)
        self.w_norm.copy_(torch.linalg.vector_norm(weight, dim=0, dtype=acc))

    def coefficients(self, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """(λ/r) / (‖b_i‖ ‖a_i‖) per rank-one term, (r,), norms in >= float32."""
        acc = torch.promote_types(A.dtype, torch.float32)
        nb = torch.linalg.vector_norm(B, dim=0, dtype=acc).clamp_min(NORM_FLOOR)
        na = torch.linalg.vector_norm(A, dim=1, dtype=acc).clamp_min(NORM_FLOOR)
        return ((self.lam.to(acc) / self.rank) / (nb * na)).to(A.dtype)

    def delta(self, x, mask):
        A = torch.cat([self.A, self.A0]) * self.w_norm              # (2r, in): Σ_W folded in
        coef = torch.cat([self.coefficients(self.B, self.A), -self.coefficients(self.B0, self.A0)])
        if mask is not None:
            coef = coef * torch.cat([mask, mask])
        return F.linear(F.linear(x, A) * coef, torch.cat([self.B, self.B0], dim=1))

    def forward(self, x, y, weight, mask=None):
        return y + self.delta(x, mask)

    def term(self, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """(λ/r)·B Ξ A·Σ_W, dense (out, in)."""
        return (B * self.coefficients(B, A)) @ A * self.w_norm

    def delta_weight(self, weight):
        return self.term(self.B, self.A) - self.term(self.B0, self.A0)
