"""LoKr: Kronecker product of a small full factor and a (low-rank) large one (LyCORIS [44]; study Eq. 18-21)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SpecError
from ..parts import Form
from ..registry import FORMS


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n, as LyCORIS's ``factorization`` (study Eq. 18-19).

    A positive ``factor`` dividing ``dimension`` gives (factor, dimension/factor), sorted; otherwise
    m is the divisor closest to sqrt(dimension) from below that does not exceed ``factor``
    (-1: no cap, the most balanced split).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    return balanced_split(dimension, dimension if factor < 0 else factor)


def balanced_split(dimension: int, cap: int) -> tuple[int, int]:
    """(m, n), m <= n, m·n = dimension: the divisor pair nearest sqrt(dimension) with m <= ``cap``,
    searched upwards from (1, dimension) while m + n does not grow (LyCORIS's and PEFT's loop)."""
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > cap:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def kron_shapes(in_features: int, out_features: int, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of P (small) and C (large) with P ⊗ C of shape (out, in)."""
    out_m, out_n = factorization(out_features, factor)
    in_m, in_n = factorization(in_features, factor)
    return (out_m, in_m), (out_n, in_n)


@FORMS.register("lokr", paper="LoKr (Yeh et al., LyCORIS) [44]",
                equations="study Eq. 18-21: ΔW = s·(P ⊗ C), C = B A when r < rank-limit of C",
                summary="Kronecker product of a small factor P and a large, low-rank factor C")
class LoKr(Form):
    """h = W0 x + s·(P ⊗ C) x with P (out_m, in_m) and C (out_n, in_n) from ``factorization``.

    Sizes follow LyCORIS/PEFT (``lokr_factor``, default -1: the most balanced split; P gets the
    smaller halves). As in LyCORIS, the large factor is the low-rank one, C = B A with B (out_n, r)
    and A (r, in_n); the study's Eq. 20-21 write the rank on the small factor instead. When r equals
    C's full rank min(out_n, in_n), C is kept as one dense matrix (LyCORIS's full-matrix mode); the
    rank dim is then C's smaller side (C = C·I_r or I_r·C). Ranks above that are refused.
    s = alpha/r (study Eq. 21; LyCORIS forces s = 1 in full-matrix mode, this form does not).

    Init as LyCORIS: P and A Kaiming-uniform, B zero (dense C zero), so ΔW = P ⊗ 0 = 0.
    PEFT's LoKr zeroes P instead; with P = 0 only P gets a gradient on the first step.

    Forward: x viewed as X (in_m, in_n) gives (P ⊗ C) x = vec(P X Cᵀ), with C = B·A formed first
    (out_n x in_n): one contraction over all rows, never the Kronecker product.
    rank(ΔW) = rank(P)·rank(C) <= min(out_m, in_m)·r.
    """

    options = {"lokr_factor": -1}
    rank_bound = "min(out_m, in_m)·r"

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        (out_m, in_m), (out_n, in_n) = kron_shapes(in_features, out_features, opts.get("lokr_factor", -1))
        self.in_m, self.in_n, self.out_m, self.out_n = in_m, in_n, out_m, out_n
        self.P = nn.Parameter(torch.empty(out_m, in_m))
        if rank < min(out_n, in_n):
            self.A = nn.Parameter(torch.empty(rank, in_n))
            self.B = nn.Parameter(torch.empty(out_n, rank))
        else:
            self.C = nn.Parameter(torch.empty(out_n, in_n))
        self.up_params = ("C",) if self.dense else ("B",)  # the zero-init, B-like factor (LoRA+)
        self.reset_parameters()

    @property
    def dense(self) -> bool:
        return "C" in self._parameters

    @classmethod
    def validate(cls, opts):
        f = opts["lokr_factor"]
        if isinstance(f, bool) or not isinstance(f, int) or not (f == -1 or f >= 1):
            raise SpecError(f"lokr_factor must be -1 (balanced split) or a positive integer, got {f!r}")

    @classmethod
    def max_rank(cls, in_features, out_features):
        return cls.rank_limit(in_features, out_features, {"lokr_factor": -1})

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        _, (out_n, in_n) = kron_shapes(in_features, out_features, opts["lokr_factor"])
        return min(out_n, in_n)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.P, a=math.sqrt(5))
        if self.dense:
            nn.init.zeros_(self.C)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.zeros_(self.B)

    def masked_c(self, mask) -> torch.Tensor:
        """C (out_n, in_n) with the rank mask on its rank dim: B·diag(m)·A, or the dense C's side."""
        if not self.dense:
            return self.rank_masked(self.B, mask) @ self.A
        if mask is None:
            return self.C
        return self.C * mask if self.C.shape[1] == self.rank else self.C * mask[:, None]

    def forward(self, x, y, weight, mask=None):
        X = x.reshape(-1, self.in_m, self.in_n)
        # vec(P X Cᵀ), C formed first (out_n x in_n, tiny): one contraction over all rows, never P ⊗ C.
        out = torch.einsum("oi,tij,nj->ton", self.P * self.scale, X, self.masked_c(mask))
        return y + out.reshape(*x.shape[:-1], self.out_features)

    def full_c(self) -> torch.Tensor:
        return self.C if self.dense else self.B @ self.A

    def delta_weight(self, weight):
        return torch.kron(self.P, self.full_c()) * self.scale
