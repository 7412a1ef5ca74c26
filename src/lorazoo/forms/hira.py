"""HiRA: Hadamard high-rank adaptation (Huang et al., ICLR 2025 [45]; study Eq. 17).

    W' = W0 + s·W0 ⊙ (B A),   A (r, in) Kaiming-uniform, B (out, r) zero,

so the model starts as the base, and rank(W0 ⊙ BA) <= rank(W0)·r: the update can be full rank.

Cost. The exact formulations of (W0 ⊙ BA) x for T tokens (out x in weight, rank r; FLOPs of one
training step, multiply-adds counted as 2):

- factored, Σ_k b_k ⊙ (W0 (a_k ⊙ x)): r base-sized matmuls per token, forward 2·T·r·out·in and
  about as much again in backward (grad x = Σ_k a_k ⊙ W0ᵀ(b_k ⊙ g)): ≈ 4·T·r·out·in;
- dense per step, D = s·W0 ⊙ (B A) formed once (2·r·out·in), then one matmul x Dᵀ: forward
  2·T·out·in, backward grad x = g D and grad D = gᵀ x (4·T·out·in), grad B, grad A from
  grad D ⊙ W0 (4·r·out·in): ≈ 6·T·out·in + 8·r·out·in.

The dense route is cheaper as soon as T·r > 1.5·T + 2·r, i.e. for every r >= 2 beyond a handful of
tokens (about (2/3)·r times cheaper for T >> r: 5x at r = 8; measured forward + backward on 2 CPU
threads, out = in = 512, T = 512, r = 8: 339 ms factored, 81 ms dense; 1024, T = 2048, r = 16:
6.2 s against 0.43 s). It is what this form does, as the authors' code does (it forms
W0 ⊙ (1 + BA) each forward). Either way the update costs whole
base-sized matmuls, where LoRA's costs 6·T·r·(in + out): on an adapted layer HiRA's training step is
about 10·T·out·in against LoRA's 4·T·out·in (base forward and input gradient), ~2.5x, a property of
Eq. 17, not of this code. (Folding the base matmul in, x (W0 ⊙ (1 + s·BA))ᵀ as the authors do,
would make the layer 6·T·out·in instead of 10·T·out·in, but needs the layer to skip its own W0 x.)

Memory. A custom autograd function keeps only x, B, A and a reference to W0 for backward and
recomputes D there (2·r·out·in FLOPs more), so no (out, in) tensor lives from forward to backward:
activation memory is LoRA's; the (out, in) temporaries exist only inside one layer's forward or
backward.

Choices: s comes from the scale part (study Eq. 17 writes alpha/r; the authors' code uses no scale:
``scale="constant", alpha=1`` reproduces it). W0 is the weight the layer runs (its base as
currently merged/shifted), as DoRA reads it. The rank mask acts on the rank dim of B A:
W0 ⊙ (B diag(m) A). Merge is W0 ⊙ (1 + s·BA) (in >= float32) and unmerge divides by the same
factor, exact to rounding; an entry with 1 + s·(BA)_ij = 0 would erase W0_ij, so such a merge is
refused. Inits that set plain B·A factors (PiSSA, EVA, LoRA-GA) are refused: here B·A is a
multiplicative mask on W0, not an additive update, so their SVD/gradient choices mean nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NotMergeableError
from ..parts import Form
from ..registry import FORMS
from .lora import LoRA


class HadamardLinear(torch.autograd.Function):
    """x (W ⊙ (B A))ᵀ with D = W ⊙ (B A) recomputed in backward instead of saved."""

    @staticmethod
    def forward(ctx, x, weight, B, A):
        ctx.save_for_backward(x, weight, B, A)
        return F.linear(x, weight * (B @ A))

    @staticmethod
    def backward(ctx, g):
        x, weight, B, A = ctx.saved_tensors
        need_x, need_w, need_B, need_A = ctx.needs_input_grad
        P = B @ A                                  # (out, in), recomputed
        grad_x = grad_w = grad_B = grad_A = None
        if need_x:
            grad_x = g.matmul(weight * P)
        if need_w or need_B or need_A:
            grad_D = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, in)
            if need_w:
                grad_w = grad_D * P
            grad_P = grad_D.mul_(weight)
            if need_B:
                grad_B = grad_P @ A.T
            if need_A:
                grad_A = B.T @ grad_P
        return grad_x, grad_w, grad_B, grad_A


@FORMS.register("hira", paper="HiRA (Huang et al., 2025) [45]",
                equations="study Eq. 17: ΔW = s·W0 ⊙ (B A); rank(ΔW) <= rank(W0)·r",
                summary="Hadamard product of the frozen weight with a rank-r product: high-rank update")
class HiRA(LoRA):
    """h = W0 x + (W0 ⊙ s·B diag(m) A) x with LoRA's A (Kaiming-uniform) and B (zero); see the module
    docstring for the cost analysis and choices."""

    rank_bound = "rank(W0)·r"
    plain_product = False
    factors = Form.factors  # B·A multiplies W0 elementwise: no plain additive factors for inits

    def scaled_b(self, mask: torch.Tensor | None) -> torch.Tensor:
        """s·B diag(m), (out, r)."""
        return self.rank_masked(self.B, mask) * self.scale

    def forward(self, x, y, weight, mask=None):
        return y + HadamardLinear.apply(x, weight, self.scaled_b(mask), self.A)

    def delta_weight(self, weight):
        return weight * (self.B @ self.A) * self.scale

    # --- merge: W' = W ⊙ (1 + s·BA), unmerge W = W' / (1 + s·BA) -----------------------------
    def _gain(self, weight: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(weight.dtype, torch.float32)
        g = 1 + (self.B.to(acc) @ self.A.to(acc)) * self.scale
        if not torch.isfinite(g).all() or (g == 0).any():
            raise NotMergeableError("HiRA factor 1 + s·(BA)_ij is zero or not finite for some entry; merging "
                                    "would erase that entry of the weight, so the adapter stays unmerged")
        return g

    def merge(self, weight):
        g = self._gain(weight)
        return (weight.to(g.dtype) * g).to(weight.dtype)

    def unmerge(self, merged):
        g = self._gain(merged)
        return (merged.to(g.dtype) / g).to(merged.dtype)
