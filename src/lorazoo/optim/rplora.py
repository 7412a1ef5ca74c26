"""RPLoRA, Riemannian preconditioned LoRA (Zhang & Pilanci, 2024 [66]; study Eq. 65-67).

The gradients of the factors are preconditioned by the r x r Gram matrix of the other factor
(the scaled-GD metric of Mishra & Sepulchre on fixed-rank matrices). The study writes Eq. 65 for
W̃ = W0 + A·B with A (in, r), B (r, out): ∇A* = ∇A (B Bᵀ)⁻¹, ∇B* = (AᵀA)⁻¹ ∇B. In torch's (out, in)
layout, ΔW = s·B·A with B (out, r), A (r, in), that is

    g_A' = (BᵀB + δI)⁻¹ g_A,        g_B' = g_B (AAᵀ + δI)⁻¹,

δ = ``rplora_damping`` (1e-6, the authors' ``reg``), which keeps the inverse defined at B = 0. A
gradient step then moves the weight, to first order, by −η s(B g_A' + g_B' A) = −η s²(Π_B g + g Π_A)
(g = ∂L/∂W̃, Π_B = B(BᵀB)⁻¹Bᵀ, Π_A = Aᵀ(AAᵀ)⁻¹A when δ → 0): a projection of the full gradient that
does not depend on how the product is split between B and A (B·R, R⁻¹·A give the same step), the
invariance behind the width-stable Δf of Eq. 66-67 (tested).

As the authors' code, the preconditioned gradient is what the optimizer (AdamW) then sees; the
preconditioner is read from the factors before the step. Departure: the authors' AdamW updates A
first and preconditions B's gradient with the already-updated A (their ``scaler_temp`` aliases
A's storage); here both use the current factors, the simultaneous Riemannian gradient of the paper.
The r x r algebra runs in float64 (a Cholesky solve); the result is written back in the
parameters' dtype. The optimizer keeps no extra state: the preconditioner is recomputed each step.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..parts import Form, Optim, check_number
from ..registry import OPTIMS


def rplora_gradients(B, A, g_B, g_A, damping: float):
    """(g_B', g_A') of Eq. 65 in (out, in) layout, damped by ``damping``·I, in float64."""
    B, A, g_B, g_A = (t.detach().to(torch.float64) for t in (B, A, g_B, g_A))
    eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    L_B = torch.linalg.cholesky(B.T @ B + damping * eye)
    L_A = torch.linalg.cholesky(A @ A.T + damping * eye)
    new_A = torch.cholesky_solve(g_A, L_B)                   # (BᵀB + δI)⁻¹ g_A
    new_B = torch.cholesky_solve(g_B.T, L_A).T               # g_B (AAᵀ + δI)⁻¹ (symmetric)
    return new_B, new_A


@OPTIMS.register("rplora", paper="Riemannian preconditioned LoRA (Zhang & Pilanci, 2024) [66]",
                 equations="study Eq. 65-67; g_A' = (BᵀB + δI)⁻¹ g_A, g_B' = g_B (AAᵀ + δI)⁻¹",
                 summary="precondition A's gradient by (BᵀB + δI)⁻¹ and B's by (AAᵀ + δI)⁻¹ (scaled GD)")
class RPLoRA(Optim):
    options = {"rplora_damping": 1e-6}

    @classmethod
    def validate(cls, opts):
        check_number("rplora_damping", opts["rplora_damping"], strict=True)

    @classmethod
    def check_form(cls, form_cls):
        if form_cls.factors is Form.factors or form_cls.multiplicative:
            raise SpecError(
                f"optim 'rplora' preconditions the gradients of the factors of an additive update s·B·A, "
                f"which form '{form_cls.part_name}' does not have; use a factorized form such as 'lora' or "
                f"'dora', or optim='default'")

    @torch.no_grad()
    def before_step(self, handle, optimizer):
        damping = self.spec.options["rplora_damping"]
        for ad in handle.adapters().values():
            B, A = ad.form.factors()
            if B.grad is None or A.grad is None:
                continue
            new_B, new_A = rplora_gradients(B, A, B.grad, A.grad, damping)
            B.grad.copy_(new_B)
            A.grad.copy_(new_A)
