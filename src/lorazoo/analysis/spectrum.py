"""The spectrum of a matrix: singular values, numerical rank, effective (entropy) rank, stable rank.

- numerical rank: the number of singular values above ``tol``; by default
  ``tol = max(m, n) · eps(dtype) · σ_max`` with eps of the matrix's own dtype (NumPy's
  ``matrix_rank`` convention), so a float32 product of rank-r factors has rank r although its
  rounding leaves ~1e-7·σ_max in the other singular values.
- effective rank (the unified study's Eq. 54, RaLoRA; Roy & Vetterli 2007):
  ``erank(M) = exp(-Σ_k p_k log p_k)``, ``p_k = σ_k / Σ_j σ_j``: k equal nonzero singular values give
  exactly k; zero singular values contribute 0 (0·log 0 = 0); the zero matrix has effective rank 0
  (RaLoRA's block count floors it at 1 itself, see inits/ralora.py).
- stable rank: ``‖M‖_F² / σ_max²`` (<= rank).

Decompositions run in at least float32 (float64 input stays float64).
"""
from __future__ import annotations

import math

import torch

from ..errors import LorazooError


def _matrix(M: torch.Tensor, what: str = "the matrix") -> torch.Tensor:
    if not torch.is_tensor(M) or M.dim() != 2:
        shape = tuple(M.shape) if torch.is_tensor(M) else type(M).__name__
        raise LorazooError(f"{what} must be a 2-D tensor, got {shape}")
    if not M.is_floating_point():
        raise LorazooError(f"{what} must hold floating-point values, got {M.dtype}")
    if not bool(torch.isfinite(M).all()):
        raise LorazooError(f"{what} holds NaN or infinite values")
    return M


def work(M: torch.Tensor) -> torch.Tensor:
    """``M`` detached in at least float32, for decompositions of low-precision weights."""
    return M.detach().to(torch.promote_types(M.dtype, torch.float32))


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """σ_1 >= σ_2 >= ... of a 2-D tensor, in at least float32."""
    return torch.linalg.svdvals(work(_matrix(M)))


def rank_tolerance(M: torch.Tensor, sigma: torch.Tensor | None = None, rtol: float | None = None) -> float:
    """The absolute threshold of :func:`numerical_rank`: ``rtol · σ_max`` with
    ``rtol = max(m, n) · eps(M.dtype)`` unless given."""
    sigma = singular_values(M) if sigma is None else sigma
    if rtol is None:
        rtol = max(M.shape) * torch.finfo(M.dtype).eps
    return float(rtol) * (float(sigma[0]) if sigma.numel() else 0.0)


def numerical_rank(M: torch.Tensor, rtol: float | None = None) -> int:
    """Number of singular values above :func:`rank_tolerance` (0 for the zero matrix)."""
    s = singular_values(M)
    if not s.numel() or not float(s[0]) > 0:
        return 0
    return int((s > rank_tolerance(M, s, rtol)).sum())


def effective_rank(M: torch.Tensor) -> float:
    """Study Eq. 54: ``exp(-Σ p log p)`` with ``p = σ / Σσ``; 0.0 for the zero matrix."""
    return _entropy_rank(singular_values(M))


def _entropy_rank(s: torch.Tensor) -> float:
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(M: torch.Tensor) -> float:
    """``‖M‖_F² / σ_max²``; 0.0 for the zero matrix."""
    s = singular_values(M)
    if not s.numel() or not float(s[0]) > 0:
        return 0.0
    return float((s ** 2).sum() / s[0] ** 2)


def spectrum(M: torch.Tensor, rtol: float | None = None, top: int | None = None) -> dict:
    """Everything above for one matrix, JSON-ready: shape, Frobenius norm, singular values (the
    ``top`` largest, all by default), numerical rank with the tolerance used, effective and stable rank."""
    M = _matrix(M)
    s = singular_values(M)
    nonzero = bool(s.numel()) and float(s[0]) > 0
    tol = rank_tolerance(M, s, rtol) if nonzero else 0.0
    return {
        "shape": list(M.shape),
        "frobenius_norm": float(torch.linalg.vector_norm(s)),
        "singular_values": [float(v) for v in (s if top is None else s[:top])],
        "rank": int((s > tol).sum()) if nonzero else 0,
        "rank_tolerance": tol,
        "rank_rtol": (float(rtol) if rtol is not None else max(M.shape) * torch.finfo(M.dtype).eps),
        "effective_rank": _entropy_rank(s),
        "stable_rank": float((s ** 2).sum() / s[0] ** 2) if nonzero else 0.0,
        "max_rank": min(M.shape),
    }
