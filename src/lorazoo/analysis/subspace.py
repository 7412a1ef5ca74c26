"""Subspace similarity between two adapters (LoRA paper, Sec. 7.2, Eq. 4; Figs. 3-4).

For learned A matrices A1 (r1, k) and A2 (r2, k) (LoRA's A ∈ R^{r×k}: rank × input features), take
the SVDs and the *right*-singular unitary matrices U_{A1}, U_{A2} (their columns span the row
spaces of A1 and A2, in the input space R^k), ordered by decreasing singular value. Then

    φ(A1, A2, i, j) = ‖U_{A1}^{i ᵀ} U_{A2}^{j}‖_F² / min(i, j)  ∈ [0, 1],

with U^i the first i columns (top-i singular directions). φ = 1 when one top subspace contains
the other, 0 when they are orthogonal. The grid over 1 <= i <= r1, 1 <= j <= r2 is the heatmap
of the paper's Figs. 3-4 (A_{r=8} against A_{r=64}; two seeds of A_{r=64}; a random Gaussian
baseline).

φ depends on A only through its right singular vectors: a change of basis A -> R·A (R invertible)
keeps the row space, so φ at i = rank(A1), j = rank(A2) is unchanged (the top-i directions for
smaller i do change, since they depend on the singular values). Computed from one r1 x r2 product
and a 2-D cumulative sum, O(r1·r2) for the whole grid after the two SVDs.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError
from .spectrum import _matrix, work


def right_singular_basis(A: torch.Tensor) -> torch.Tensor:
    """The right-singular vectors of A (r, k) as rows, ordered by decreasing singular value: (min(r, k), k)."""
    return torch.linalg.svd(work(_matrix(A, "A")), full_matrices=False).Vh


def _bases(A1: torch.Tensor, A2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    V1, V2 = right_singular_basis(A1), right_singular_basis(A2)
    if V1.shape[1] != V2.shape[1]:
        raise LorazooError(f"the A matrices act on different input sizes: {tuple(A1.shape)} and {tuple(A2.shape)} "
                           f"(A is (rank, in_features); compare adapters of the same layer)")
    dtype = torch.promote_types(V1.dtype, V2.dtype)
    return V1.to(dtype), V2.to(dtype)


def _check_index(name: str, value, limit: int, which: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LorazooError(f"{name} must be an integer >= 1, got {value!r}")
    if value > limit:
        raise LorazooError(f"{name} = {value} exceeds the number of singular directions of {which} ({limit}; "
                           f"A is (rank, in_features), so at most min(rank, in_features))")
    return value


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """Eq. 4: φ(A1, A2, i, j) = ‖U_{A1}^{iᵀ} U_{A2}^j‖_F² / min(i, j), U the right-singular vectors."""
    V1, V2 = _bases(A1, A2)
    i = _check_index("i", i, V1.shape[0], "A1")
    j = _check_index("j", j, V2.shape[0], "A2")
    return float((V1[:i] @ V2[:j].T).pow(2).sum() / min(i, j))


def subspace_similarity_grid(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) for every 1 <= i <= min(r1, k), 1 <= j <= min(r2, k): a tensor whose entry
    [i - 1, j - 1] is φ(i, j) (rows i of A1, columns j of A2, as the paper's heatmaps)."""
    V1, V2 = _bases(A1, A2)
    S = (V1 @ V2.T).pow(2).cumsum(0).cumsum(1)
    i = torch.arange(1, S.shape[0] + 1, dtype=S.dtype)
    j = torch.arange(1, S.shape[1] + 1, dtype=S.dtype)
    return S / torch.minimum(i[:, None], j[None, :])


def random_gaussian_like(A: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A standard Gaussian matrix of A's shape (the random baseline of the paper's Fig. 4, right)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(A.shape), generator=g, dtype=work(A).dtype)
