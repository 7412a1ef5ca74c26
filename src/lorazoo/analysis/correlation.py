"""How alike two updates ΔW1, ΔW2 of one layer are (LoRMA paper, Sec. 5.6, Table 9).

LoRMA compares ΔW_LoRA with ΔW_LoRMA (ΔW = final adapted weight minus the frozen weight) by:

- ``frobenius_distance``: ‖ΔW1 − ΔW2‖_F (lower: more similar);
- ``cosine``: cosine similarity of the flattened matrices, ⟨ΔW1, ΔW2⟩_F / (‖ΔW1‖_F ‖ΔW2‖_F);
- ``singular_value_ssd``: Σ_{k<=r} (σ_k(ΔW1) − σ_k(ΔW2))², the paper's (·,·)_S^r;
- ``eigenvalue_ssd``: Σ_{k<=r} |λ_k(ΔW1) − λ_k(ΔW2)|², the paper's (·,·)_E^r, square layers only
  (None otherwise), eigenvalues ordered by decreasing modulus (they may be complex);
- ``principal_angles``: the principal angles between the two column spaces, in radians, largest
  first, and ``max_angle`` = the first of them, the paper's Θ_1 (0: one space inside the other,
  π/2: a direction of one orthogonal to the other).

Choices (the paper gives no formulas): a column space is spanned by the left singular vectors
above the numerical-rank tolerance of :mod:`lorazoo.analysis.spectrum` (scipy's ``orth`` does the
same with eps·max(m, n) in float64); Θ_1 is the largest angle, which is what
``scipy.linalg.subspace_angles(...)[0]`` returns and what fits the table (≈ π/2 for a random
matrix, ≈ 0 where the full-rank LoRMA update contains LoRA's column space); r defaults to
the smaller numerical rank of the two (at least 1).
"""
from __future__ import annotations

import math

import torch

from ..errors import LorazooError
from .spectrum import _matrix, numerical_rank, rank_tolerance, work


def column_space(M: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """An orthonormal basis (m, rank) of M's column space at its numerical rank."""
    U, s, _ = torch.linalg.svd(work(_matrix(M)), full_matrices=False)
    if not s.numel() or not float(s[0]) > 0:
        return U[:, :0]
    return U[:, : int((s > rank_tolerance(M, s, rtol)).sum())]


def principal_angles(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, largest first) between the spans of the orthonormal columns of Q1
    and Q2, min(k1, k2) of them: arccos of the singular values of Q1ᵀ Q2 (Björck & Golub), and for
    angles below π/4, where arccos loses accuracy, arcsin of those of (I − Q1 Q1ᵀ) Q2 (k1 >= k2),
    as scipy.linalg.subspace_angles."""
    if Q1.shape[0] != Q2.shape[0]:
        raise LorazooError(f"the subspaces live in different spaces: {Q1.shape[0]} and {Q2.shape[0]} rows")
    if Q1.shape[1] < Q2.shape[1]:
        Q1, Q2 = Q2, Q1
    dtype = torch.promote_types(Q1.dtype, Q2.dtype)
    Q1, Q2 = Q1.to(dtype), Q2.to(dtype)
    if Q2.shape[1] == 0:
        return Q2.new_zeros(0)
    cos = torch.linalg.svdvals(Q1.T @ Q2).clamp(0.0, 1.0)               # descending: angles ascending
    sin = torch.linalg.svdvals(Q2 - Q1 @ (Q1.T @ Q2)).clamp(0.0, 1.0)   # descending: angles descending
    ascending = torch.where(cos ** 2 >= 0.5, torch.arcsin(sin.flip(0)), torch.arccos(cos))
    return ascending.flip(0)


def _top_eigenvalues(M: torch.Tensor, r: int) -> torch.Tensor:
    ev = torch.linalg.eigvals(M)
    return ev[torch.argsort(ev.abs(), descending=True)][:r]


def correlation(delta1: torch.Tensor, delta2: torch.Tensor, r: int | None = None,
                rtol: float | None = None) -> dict:
    """The LoRMA paper's Table 9 for one layer (see the module docstring); JSON-ready."""
    delta1, delta2 = _matrix(delta1, "ΔW1"), _matrix(delta2, "ΔW2")
    if delta1.shape != delta2.shape:
        raise LorazooError(f"ΔW1 {tuple(delta1.shape)} and ΔW2 {tuple(delta2.shape)} must have the same shape "
                           f"(compare updates of the same layer)")
    ranks = (numerical_rank(delta1, rtol), numerical_rank(delta2, rtol))
    if r is None:
        r = max(1, min(ranks))
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(delta1.shape):
        raise LorazooError(f"r must be an integer in [1, {min(delta1.shape)}], got {r!r}")
    dtype = torch.promote_types(work(delta1).dtype, work(delta2).dtype)
    D1, D2 = work(delta1).to(dtype), work(delta2).to(dtype)
    n1, n2 = float(torch.linalg.matrix_norm(D1)), float(torch.linalg.matrix_norm(D2))
    s1, s2 = torch.linalg.svdvals(D1)[:r], torch.linalg.svdvals(D2)[:r]
    eig = None
    if D1.shape[0] == D1.shape[1]:
        eig = float((_top_eigenvalues(D1, r) - _top_eigenvalues(D2, r)).abs().pow(2).sum())
    angles = principal_angles(column_space(delta1, rtol).to(dtype), column_space(delta2, rtol).to(dtype))
    return {
        "r": r,
        "ranks": list(ranks),
        "frobenius_distance": float(torch.linalg.matrix_norm(D1 - D2)),
        "cosine": float((D1 * D2).sum() / (n1 * n2)) if n1 > 0 and n2 > 0 else math.nan,
        "singular_value_ssd": float((s1 - s2).pow(2).sum()),
        "eigenvalue_ssd": eig,
        "max_angle": float(angles[0]) if angles.numel() else math.nan,
        "principal_angles": [float(a) for a in angles],
    }
