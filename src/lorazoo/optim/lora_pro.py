"""LoRA-Pro (Wang et al., 2025 [25]; study Eq. 77-84): align LoRA's equivalent gradient with full FT.

With ΔW = s·B·A (B out x r, A r x in) and g = ∂L/∂W, LoRA's gradients are g_A = s·Bᵀg and
g_B = s·g·Aᵀ, and an SGD step on (A, B) moves W along the equivalent gradient s·(B·g_A' + g_B'·A).
LoRA-Pro replaces (g_A, g_B) by the minimizer of ‖s·(B·g_A' + g_B'·A) − g‖²_F (Eq. 77; the study
writes it transposed, with W (in, out) = W0 + s·A·B):

    g_A' = (1/s²)(BᵀB)⁻¹ g_A + X·A                                   (Eq. 81)
    g_B' = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B·X                  (Eq. 82)

so that s·(B·g_A' + g_B'·A) = Π_B g + (I − Π_B) g Π_A, the projection of g onto the tangent space
{B·dA + dB·A} (X cancels). X is the one the paper chooses: the minimizer of
‖g_A' − g_A‖² + ‖g_B' − g_B‖² (Eq. 83), i.e. the solution of the Sylvester equation (Eq. 84)

    BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ.

Only g_A and g_B are read (g is never formed). BᵀB = U diag(λ) Uᵀ and AAᵀ = V diag(μ) Vᵀ are
symmetric PSD, so with C̃ = UᵀCV the solution is X = U [C̃_ij / (λ_i + μ_j)] Vᵀ. As in the official
code, BᵀB and AAᵀ are damped by ``lora_pro_damping``·I (1e-8) wherever they are inverted and in the
Sylvester equation, so that B = 0 at init is handled: then g_A = 0, X = 0, g_A' = 0 and
g_B' = (1/s²) g_B (AAᵀ + δI)⁻¹, whose equivalent gradient is g·Π_A. The r x r algebra and the
products run in float64; the adjusted gradients are written back in the parameters' dtype.

Simplification: this is the paper's gradient adjustment (Eq. 77-84; the official code's
"efficient" mode), used with any optimizer, which then keeps its state on A and B. The paper's
AdamW variant that keeps Adam moments of the full (out x in) equivalent gradient ("full" mode) is
not implemented: it is not in the study's equations and costs full-size optimizer state per layer.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..parts import Form, Optim, check_number
from ..registry import OPTIMS


def sylvester_psd(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P·X + X·Q = C, for symmetric PSD P, Q (not both singular on a shared direction)."""
    lam, U = torch.linalg.eigh(P)
    mu, V = torch.linalg.eigh(Q)
    return U @ ((U.T @ C @ V) / (lam[:, None] + mu[None, :])) @ V.T


def inverse_psd(P: torch.Tensor) -> torch.Tensor:
    lam, U = torch.linalg.eigh(P)
    return (U / lam) @ U.T


def lora_pro_gradients(B, A, g_B, g_A, scale: float, damping: float):
    """The adjusted (g_B', g_A') and X of Eq. 81-84 for ΔW = scale·B·A, in float64."""
    B, A, g_B, g_A = (t.detach().to(torch.float64) for t in (B, A, g_B, g_A))
    eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    BtB = B.T @ B + damping * eye
    AAt = A @ A.T + damping * eye
    BtB_inv, AAt_inv = inverse_psd(BtB), inverse_psd(AAt)
    s2 = scale * scale
    X = sylvester_psd(BtB, AAt, -(BtB_inv @ g_A @ A.T) / s2)
    new_A = BtB_inv @ g_A / s2 + X @ A
    gB_AAt_inv = g_B @ AAt_inv
    new_B = (gB_AAt_inv - B @ (BtB_inv @ (B.T @ gB_AAt_inv))) / s2 - B @ X
    return new_B, new_A, X


@OPTIMS.register("lora_pro", paper="LoRA-Pro (Wang et al., 2025) [25]",
                 equations="study Eq. 77-84; g_A' = (1/s²)(BᵀB)⁻¹g_A + XA, "
                           "g_B' = (1/s²)(I − B(BᵀB)⁻¹Bᵀ)g_B(AAᵀ)⁻¹ − BX, X from Eq. 84",
                 summary="gradients of A, B adjusted so the equivalent update best matches full fine-tuning")
class LoRAPro(Optim):
    options = {"lora_pro_damping": 1e-8}

    @classmethod
    def validate(cls, opts):
        check_number("lora_pro_damping", opts["lora_pro_damping"], strict=True)

    @classmethod
    def check_form(cls, form_cls):
        if form_cls.factors is Form.factors or form_cls.multiplicative or not form_cls.plain_product:
            raise SpecError(
                f"optim 'lora_pro' adjusts the gradients of the factors of an additive update s·B·A, "
                f"which form '{form_cls.part_name}' does not have; use it with a factorized form such as "
                f"'lora', or use optim='default'"
            )

    @torch.no_grad()
    def before_step(self, handle, optimizer):
        damping = self.spec.options["lora_pro_damping"]
        for ad in handle.adapters().values():
            B, A = ad.form.factors()
            if B.grad is None or A.grad is None:
                continue
            new_B, new_A, _ = lora_pro_gradients(B, A, B.grad, A.grad, ad.form.scale, damping)
            B.grad.copy_(new_B)
            A.grad.copy_(new_A)
