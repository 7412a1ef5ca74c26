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
6.2 s against 0.43 s). It is what this form does, as the authors' code does. Either way the update
costs whole base-sized matmuls, where LoRA's costs 6·T·r·(in + out). When HiRA is the layer's only
running adapter, the layer folds the base matmul in, x (W0 ⊙ (1 + s·BA))ᵀ as the authors' forward
does (forms/dense.py): the layer's step is then 6·T·out·in instead of 10·T·out·in (base forward and
input gradient, plus the update's three), against LoRA's 4·T·out·in. Measured (512 -> 1376, 512
tokens, one thread, forward + backward beside LoRA in one run): 2.1x LoRA's time before the fold,
1.0-1.6x after; `lorazoo bench --layers 2`: 1.63x -> 1.21-1.45x LoRA's step (a loaded machine).

Memory. The shared dense autograd function keeps only x, B, A and a reference to W0 for backward and
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

from ..errors import NotMergeableError
from ..parts import Form
from ..registry import FORMS
from .dense import DenseForm
from .lora import LoRA


@FORMS.register("hira", paper="HiRA (Huang et al., 2025) [45]",
                equations="study Eq. 17: ΔW = s·W0 ⊙ (B A); rank(ΔW) <= rank(W0)·r",
                summary="Hadamard product of the frozen weight with a rank-r product: high-rank update")
class HiRA(DenseForm, LoRA):
    """h = W0 x + (W0 ⊙ s·B diag(m) A) x with LoRA's A (Kaiming-uniform) and B (zero); see the module
    docstring for the cost analysis and choices."""

    rank_bound = "rank(W0)·r"
    plain_product = False
    factors = Form.factors  # B·A multiplies W0 elementwise: no plain additive factors for inits

    def dense_update(self, weight, P):
        """ΔW = s·W0 ⊙ P, P = B diag(m) A (Eq. 17)."""
        return weight * P * self.scale

    def dense_slope(self, weight, P):
        return weight * self.scale

    def dense_weight_slope(self, weight, P):
        return P * self.scale

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
