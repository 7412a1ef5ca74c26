"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024 [67]; study Eq. 68, 135).

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row

with the norm taken per output row of the (out, in) weight (over the input dimension), as DoRA's
official code and PEFT do; m (out,) is trainable and starts at the row norms of the initial
weight, so the model starts as the base.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotMergeableError, SpecError
from ..registry import FORMS
from .lora import LoRA


@FORMS.register("dora", paper="DoRA (Liu et al., 2024) [67]",
                equations="study Eq. 68, 135: W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_row",
                summary="LoRA direction, normalized per output row, times a trainable magnitude m")
class DoRA(LoRA):
    """h = g ⊙ (W0 x + s·B(M ⊙ A x)),  g = m / ‖W0 + s·B diag(M) A‖_row  (Eq. 68; M the rank mask).

    The forward never forms the (out, in) sum: with w_i, b_i the rows of W0 and B,

        ‖w_i + s·b_i A‖² = ‖w_i‖² + 2s·b_i·(W0 Aᵀ)_i + s²·b_i (A Aᵀ) b_iᵀ

    needs only W0 Aᵀ (out, r) and A Aᵀ (r, r); it is recomputed each forward from the current
    weight, so base shifts (PiSSA, ReLoRA) and merged adapters below are always seen.

    Option ``dora_detach_norm`` (default True): treat the norm as a constant in backward, as the
    DoRA paper proposes (Sec. 4.3) and as its official code and PEFT do; the norm is then
    computed without autograd. False gives the exact gradient through the norm; thanks to the
    factorization it only costs (out, r) and (r, r) extra tensors, not an (out, in) one.

    With input dropout, the dropped-out input feeds the low-rank branch only and the base output
    is rescaled undropped (PEFT re-runs the base matmul on the dropped input instead); without
    dropout, and at inference, the two agree.
    """

    reads_output = True
    rank_bound = "full"  # W' - W0 = (diag(g) - I) W0 + s·diag(g) B A: the rescale is full rank
    options = {"dora_detach_norm": True}

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.detach_norm = bool(opts["dora_detach_norm"])
        # the trainable magnitude; after_factor_init sets it to the initial row norms
        self.m = nn.Parameter(torch.ones(out_features))
        self.register_buffer("merged_norm", None, persistent=False)  # cached by merge for unmerge

    @classmethod
    def validate(cls, opts):
        if not isinstance(opts["dora_detach_norm"], bool):
            raise SpecError(f"dora_detach_norm must be True or False, got {opts['dora_detach_norm']!r}")

    def row_norm(self, weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·B diag(mask) A‖ per output row, factorized (see the class docstring)."""
        grad = contextlib.nullcontext() if not self.detach_norm else torch.no_grad()
        with grad:
            acc = torch.promote_types(weight.dtype, torch.float32)  # combine in >= float32
            B = self.rank_masked(self.B, mask).to(acc)
            WA = F.linear(weight, self.A).to(acc)          # (out, r) = W0 Aᵀ
            AA = (self.A @ self.A.T).to(acc)                # (r, r)
            w2 = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
            s = self.scale
            n2 = w2 + 2 * s * (B * WA).sum(1) + s * s * ((B @ AA) * B).sum(1)
            return n2.clamp_min(0).sqrt().to(weight.dtype)

    def after_factor_init(self, weight: torch.Tensor) -> None:
        """m = ‖W + s·BA‖_row of the weight and factors the init left, so W' = W at the start."""
        with torch.no_grad():
            self.m.copy_(self.row_norm(weight))

    def gain(self, norm: torch.Tensor) -> torch.Tensor:
        """g = m / ‖V‖_row; 1 on a row whose V is zero (a pruned unit: its direction is undefined and
        the row stays zero), where m / ‖V‖ would be 0/0."""
        return torch.where(norm > 0, self.m / torch.where(norm > 0, norm, 1), 1)

    def forward(self, x, y, weight, mask=None):
        return (y + self.delta(x, mask)) * self.gain(self.row_norm(weight, mask))

    def update_factors(self, weight):
        return self.B * self.scale, self.A  # the direction's update; the gain comes apart

    def output_gain(self, weight):
        return self.gain(self.row_norm(weight))

    # --- merge: dense, once ------------------------------------------------------------------
    def _direction(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A) * self.scale

    def _gain(self, norm: torch.Tensor) -> torch.Tensor:
        g = self.gain(norm)
        if not torch.isfinite(g).all() or (g == 0).any():
            raise NotMergeableError("DoRA magnitude or row norm is zero or not finite in some row; "
                                    "merging would lose that row, so the adapter stays unmerged")
        return g

    def delta_weight(self, weight):
        V = self._direction(weight)
        return V * self.gain(V.norm(dim=1))[:, None] - weight

    def merge(self, weight):
        V = self._direction(weight)
        norm = V.norm(dim=1)
        out = V * self._gain(norm)[:, None]
        self.merged_norm = norm  # unmerge divides by exactly the gain used here
        return out

    def unmerge(self, merged):
        if self.merged_norm is None:
            raise NotMergeableError("DoRA unmerge without a preceding merge")
        V = merged / self.gain(self.merged_norm)[:, None]
        self.merged_norm = None
        return V - (self.B @ self.A) * self.scale
