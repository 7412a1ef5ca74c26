"""Dense updates: forms whose ΔW has no factored form and is formed as an (out, in) matrix each step
(HiRA's W0 ⊙ s·BA, Sine-LoRA's s·sin(ω·BA)/g, LoRAN's s·f(BA)).

- :class:`DenseLinear` computes x Mᵀ for M = make(W0, *tensors) and recomputes M in backward from
  the small tensors (B, A, the rank mask), differentiating ``make`` with autograd there. Between
  forward and backward it keeps x and those tensors (W0 by reference), never an (out, in) tensor of
  its own, so activation memory is LoRA's. Backward: grad x = g M, grad M = gᵀ x, and B's and A's
  gradients through ``make`` (2·r·out·in more for the product).
- :class:`DenseForm` is the form side: a form gives ``dense_update(W0, *dense_inputs(mask))`` = ΔW,
  and gets its forward (y + x ΔWᵀ), its ``delta_weight`` and ``fused``. When it is the only adapter
  running on a layer, the layer calls ``fused``: x (W0 + ΔW)ᵀ as one matmul instead of the base's
  x W0ᵀ plus x ΔWᵀ. Per training step and layer that is 3 (out, in)-sized matmuls over the tokens
  (forward, grad x, grad M) instead of 5 (base forward and grad x; update forward, grad x, grad ΔW),
  exact up to rounding (x (W0 + ΔW)ᵀ = x W0ᵀ + x ΔWᵀ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class DenseLinear(torch.autograd.Function):
    """x Mᵀ with M = make(weight, *tensors), recomputed in backward instead of saved."""

    @staticmethod
    def forward(ctx, x, make, weight, *tensors):
        ctx.make = make
        ctx.save_for_backward(x, weight, *tensors)
        return F.linear(x, make(weight, *tensors))

    @staticmethod
    @once_differentiable  # a second derivative through the recomputed M is not built: refused, not wrong
    def backward(ctx, g):
        x, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        # M's small graph lives only in this backward: an identity hook keeps callers' saved-tensor hooks
        # (offloading, the bench's count of what forward keeps for backward) away from it
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            leaves = [t.detach().requires_grad_() if need else t for t, need in zip(tensors, needs)]
            M = ctx.make(*leaves)
        g = g.to(M.dtype)
        grad_x = g.matmul(M.detach()) if ctx.needs_input_grad[0] else None
        grads = [None] * len(tensors)
        wanted = [i for i, need in enumerate(needs) if need]
        if wanted:
            grad_M = g.reshape(-1, g.shape[-1]).mT @ x.reshape(-1, x.shape[-1]).to(M.dtype)  # (out, in)
            got = torch.autograd.grad(M, [leaves[i] for i in wanted], grad_M, allow_unused=True)
            for i, grad in zip(wanted, got):
                grads[i] = grad
        return (grad_x, None, *grads)


class DenseForm:
    """Mixin for a form whose ΔW = ``dense_update(W0, *dense_inputs(mask))`` is formed densely.

    ``dense_update`` must be a differentiable function of its arguments only (it runs again in
    backward on detached copies); ``dense_inputs`` gives the tensors it reads besides W0.
    """

    fusable = True

    def dense_inputs(self, mask: torch.Tensor | None) -> tuple:
        return self.B, self.A, mask

    def dense_update(self, weight: torch.Tensor, *inputs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, y, weight, mask=None):
        return y + DenseLinear.apply(x, self.dense_update, weight, *self.dense_inputs(mask))

    def fused(self, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (W0 + ΔW)ᵀ, one matmul: what the layer runs when this is its only running adapter."""
        return DenseLinear.apply(x, self._with_base, weight, *self.dense_inputs(mask))

    def _with_base(self, weight, *inputs):
        return weight + self.dense_update(weight, *inputs)

    def delta_weight(self, weight):
        return self.dense_update(weight, *self.dense_inputs(None))
