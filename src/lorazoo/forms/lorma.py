"""LoRMA: low-rank multiplicative adaptation (Bihany, Patel, Modi; papers/lorma.txt).

The adapted weight is M·W0 with M a (d, d) matrix built from B (d, r) and A (r, d), d = out
features: Eq. 6 (no inflation) M = s·BA; Eq. 8 (additive inflation) M = s·BA + I; Eq. 7 and
Sec. 3.2.1 (permutation inflation) M = I_pi(BA). The forms are multiplicative: their input is
the (dropped-out) base output W0 x, so ``M W0 x`` is computed as ``M (W0 x)`` (Table 11 order).
The DropLoRA rank mask acts between A and B.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LorazooError
from ..parts import Form
from ..registry import FORMS
from .lora import LoRA


def inflate_pi(P: torch.Tensor) -> torch.Tensor:
    """I_pi (LoRMA Sec. 3.2.1): row i of the square ``P`` rotated cyclically right by i.

    I_pi(P)[i, j] = P[i, (j - i) mod d]. Built with one concatenation and views (no index
    tensor): in [P P] flattened, entry (i, j) sits at d + i·(2d - 1) + j.
    """
    d = P.shape[0]
    flat = torch.cat([P, P], dim=1).reshape(-1)
    return flat[d:d + d * (2 * d - 1)].reshape(d, 2 * d - 1)[:, :d]


class _LoRMA(LoRA):
    """Shared LoRMA pieces: B (d, r), A (r, d) over d = out features, M·W0 merge.

    Reuses LoRA's tensors, init (A Kaiming-uniform, B zero) and low-rank product
    ``delta(v) = s·B(mask ⊙ A v)``, now applied to v = W0 x. The factors are (d, d), not the
    (out, in) update, so inits that set plain B·A factors (PiSSA...) are refused.
    """

    multiplicative = True
    reads_output = True
    factors = Form.factors  # no plain additive B·A of the weight's shape

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(out_features, out_features, rank, scale, opts, ctx)  # A: (r, d = out)
        self.in_features = in_features
        self.register_buffer("merged_from", None, persistent=False)  # see merge()

    @classmethod
    def max_rank(cls, in_features, out_features):
        return out_features  # B A is (out, out)

    def matrix(self) -> torch.Tensor:
        """The (d, d) multiplier M with W' = M·W0."""
        raise NotImplementedError

    def delta_weight(self, weight):
        return self.matrix() @ weight - weight

    def merge(self, weight):
        """W' = M·W0. Unmerge solves M W = W'; a form whose M is singular caches W0 instead."""
        acc = torch.promote_types(weight.dtype, torch.float32)
        return (self.matrix().to(acc) @ weight.to(acc)).to(weight.dtype)

    def unmerge(self, merged):
        acc = torch.promote_types(merged.dtype, torch.float32)
        M = self.matrix().to(acc)
        W, info = torch.linalg.solve_ex(M, merged.to(acc))
        if info.item() != 0:
            raise LorazooError(f"cannot unmerge '{self.part_name}': its multiplier M is singular; "
                               f"reload the base weights and the saved adapter instead")
        return W.to(merged.dtype)


@FORMS.register("lorma", paper="LoRMA (Bihany et al., 2025)", equations="LoRMA Eq. 6: W' = s·BA·W0",
                summary="multiplicative low-rank update without rank inflation (ablation, Table 6)")
class LoRMA(_LoRMA):
    """h = s·B(M ⊙ A (W0 x))  (LoRMA Eq. 6, Table 11 order: cost 2·d·r per token).

    Rank(W') <= r, and W' cannot equal W0 (rank d), so it does not start from the base model;
    the init is LoRMA+'s (B zero, A Kaiming-uniform), as in the paper's Table 6 ablation where
    everything but the inflation is kept the same: the adapted layer outputs only its bias at
    the start. Merge keeps a copy of W0 for unmerge, since M = s·BA is singular.
    """

    zero_init = False

    def forward(self, x, y, weight, mask=None):
        return self.delta(x, mask)

    def matrix(self):
        return (self.B @ self.A) * self.scale

    def merge(self, weight):
        self.merged_from = weight.detach().clone()
        return (self.B @ (self.A @ weight)) * self.scale

    def unmerge(self, merged):
        if self.merged_from is None:
            raise LorazooError("lorma unmerge without a preceding merge")
        weight, self.merged_from = self.merged_from, None
        return weight


@FORMS.register("lorma_plus", paper="LoRMA (Bihany et al., 2025)",
                equations="LoRMA Eq. 8: W' = (s·BA + I)·W0, Table 11 order",
                summary="multiplicative update with additive rank inflation; identity at init")
class LoRMAPlus(_LoRMA):
    """h = W0 x + s·B(M ⊙ A (W0 x))  (LoRMA Eq. 8; B zero, A random, so I_+(BA) = I at init).

    The base output is reused (Table 11): cost 2·d·r per token, as LoRA. Rank of the update
    ΔW = s·BA·W0 is at most r; the multiplier s·BA + I has rank >= d - r.
    """

    def forward(self, x, y, weight, mask=None):
        return y + self.delta(x, mask)

    def matrix(self):
        M = (self.B @ self.A) * self.scale
        return M + torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


@FORMS.register("lorma_pi", paper="LoRMA (Bihany et al., 2025)",
                equations="LoRMA Eq. 7, Sec. 3.2.1: W' = I_pi(BA)·W0, row i of BA rotated by i",
                summary="multiplicative update with permutation rank inflation; identity at init")
class LoRMAPi(_LoRMA):
    """h = I_pi(B diag(M) A)·(W0 x)  (LoRMA Eq. 7; I_pi rotates row i of BA right by i).

    Init (Sec. 3.2.1): B's first column ones, the rest random (Kaiming-uniform); A[0, 0] = 1,
    the rest zero. Then BA has ones in column 0 and zeros elsewhere, and I_pi(BA) = I exactly.

    The scale s is not used: Eq. 7 has none, and it is the only way the identity init holds
    exactly in every dtype. (The authors' code multiplies by s and divides the init factors by
    sqrt(s); that spans the same multipliers and only changes the optimizer's step size on B, A.)
    The (d, d) multiplier is formed once per forward, not per token: O(d²(r + tokens)).
    With input dropout, h = y + (M - I)·drop(y), so the dropout falls on the update only.
    """

    rank_bound = "full"

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.zeros_(self.A)
        with torch.no_grad():
            self.B[:, 0] = 1.0
            self.A[0, 0] = 1.0

    def matrix(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        return inflate_pi(self.rank_masked(self.B, mask) @ self.A)

    def forward(self, x, y, weight, mask=None):
        M = self.matrix(mask)
        if x is y:
            return y @ M.T
        return y + x @ M.T - x  # y + (M - I)·drop(y)
