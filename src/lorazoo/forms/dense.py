"""Dense updates: forms whose ΔW has no factored form and is formed as an (out, in) matrix each step,
ΔW = u(W0, P) entrywise in P = B diag(m) A (HiRA's s·W0 ⊙ P, Sine-LoRA's s·sin(ω·P)/g, LoRAN's s·f(P)).

- :class:`DenseLinear` computes x Mᵀ, M = u(W0, P) (plus W0 when the base is folded in), and
  recomputes P and M in backward from x, B, A and the mask: between forward and backward it keeps
  nothing of size (out, in) but W0 itself, by reference, so activation memory is LoRA's. Backward:
  grad x = g M, grad M = gᵀ x, grad P = grad M ⊙ ∂u/∂P (the form's :meth:`DenseForm.dense_slope`),
  grad B = grad P Aᵀ diag(m), grad A = (B diag(m))ᵀ grad P. Written out, not through autograd, so that
  torch.compile traces it as one graph and saved-tensor hooks (offloading) see only what forward keeps.
- :class:`DenseForm` is the form side: a form gives u and ∂u/∂P (``dense_update``, ``dense_slope``),
  and gets its forward (y + x ΔWᵀ), ``delta_weight`` and ``fused``. When it is the only adapter running
  on a layer, the layer calls ``fused``: x (W0 + ΔW)ᵀ as one matmul instead of the base's x W0ᵀ plus
  x ΔWᵀ. Per training step and layer that is 3 (out, in)-sized matmuls over the tokens (forward, grad
  x, grad M) instead of 5 (base forward and grad x; update forward, grad x, grad ΔW), exact up to
  rounding (x (W0 + ΔW)ᵀ = x W0ᵀ + x ΔWᵀ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .autocast import promoted


class DenseLinear(torch.autograd.Function):
    """x Mᵀ, M = form.dense_update(W, P) (+ W when ``with_base``), P = B diag(m) A, recomputed in backward."""

    @staticmethod
    def forward(ctx, x, form, weight, B, A, mask, with_base):
        ctx.form, ctx.with_base = form, with_base
        ctx.save_for_backward(x, weight, B, A, mask)
        return F.linear(x, _matrix(form, weight, B, A, mask, with_base)[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        form, with_base = ctx.form, ctx.with_base
        x, weight, B, A, mask, g = promoted(*ctx.saved_tensors, g)  # autocast: bf16 x, g; float32 B, A
        M, Bm, P = _matrix(form, weight, B, A, mask, with_base)
        need_x, _, need_w, need_B, need_A = ctx.needs_input_grad[:5]
        grad_x = g.matmul(M) if need_x else None
        grad_w = grad_B = grad_A = None
        if need_w or need_B or need_A:
            grad_M = g.reshape(-1, g.shape[-1]).mT @ x.reshape(-1, x.shape[-1])  # (out, in)
            if need_w:
                slope = form.dense_weight_slope(weight, P)
                grad_w = grad_M * slope + grad_M if with_base else grad_M * slope
            grad_P = grad_M.mul_(form.dense_slope(weight, P))
            if need_B:
                grad_B = grad_P @ A.mT
                grad_B = grad_B if mask is None else grad_B * mask
            if need_A:
                grad_A = Bm.mT @ grad_P
        return grad_x, None, grad_w, grad_B, grad_A, None, None


def _matrix(form, weight, B, A, mask, with_base):
    """(M, B diag(m), P)."""
    Bm = B if mask is None else B * mask
    P = Bm @ A
    M = form.dense_update(weight, P)
    return (weight + M if with_base else M), Bm, P


class DenseForm:
    """Mixin for a form with LoRA's B, A whose ΔW = u(W0, P), P = B diag(m) A, is entrywise in P.

    Subclasses give :meth:`dense_update` u and :meth:`dense_slope` ∂u/∂P (and ∂u/∂W0 in
    :meth:`dense_weight_slope` when u reads W0), each entrywise, in the tensors' own dtype.
    """

    fusable = True

    def dense_update(self, weight: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_slope(self, weight: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight_slope(self, weight: torch.Tensor, P: torch.Tensor) -> torch.Tensor | float:
        """∂u/∂W0, entrywise (0 for updates that do not read W0); used only if W0 itself trains."""
        return 0.0

    def forward(self, x, y, weight, mask=None):
        return y + DenseLinear.apply(x, self, weight, self.B, self.A, mask, False)

    def fused(self, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (W0 + ΔW)ᵀ, one matmul: what the layer runs when this is its only running adapter."""
        return DenseLinear.apply(x, self, weight, self.B, self.A, mask, True)

    def delta_weight(self, weight):
        return self.dense_update(weight, self.B @ self.A)
