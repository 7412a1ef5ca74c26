"""How much ΔW amplifies directions of W (LoRA paper, Sec. 7.3, Table 7).

With U (out, r) and V (in, r) the left and right top-r singular vectors of ΔW, the paper projects W
onto that r-dimensional subspace, ``Uᵀ W V`` (r x r; the paper writes ``Uᵀ W Vᵀ`` with V's rows as
the directions), and compares its Frobenius norm with those obtained when U, V are instead the
top-r singular vectors of W itself, or of a random matrix:

    amplification factor = ‖ΔW‖_F / ‖Uᵀ W V‖_F     (U, V from ΔW)

(6.91 / 0.32 ≈ 21.5 for GPT-3's W_q at r = 4; 3.57 / 1.90 ≈ 1.9 at r = 64). The projection norm
onto W's own top-r directions is sqrt(σ_1(W)² + ... + σ_r(W)²).

Choices: r is the adapter's rank in the paper; here it defaults to ΔW's numerical rank (the same for
a trained LoRA; forms of higher rank than r, MeLoRA, LoRMA, report their own) and can be given.
The random directions are orthonormal bases of Gaussian matrices (QR), which are distributed as
the singular vectors of a Gaussian matrix (both Haar on the Stiefel manifold), with a fixed seed.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError
from .spectrum import _matrix, numerical_rank, work


def _top(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], Vh[:r].T


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """‖Uᵀ W V‖_F for orthonormal columns U (out, r), V (in, r)."""
    return float(torch.linalg.matrix_norm(U.T @ W @ V))


def amplification(W: torch.Tensor, delta: torch.Tensor, r: int | None = None, seed: int = 0) -> dict:
    """The numbers of the paper's Table 7 for one layer: ``‖W‖_F``, ``‖ΔW‖_F``, ``‖Uᵀ W V‖_F`` with
    U, V the top-r singular directions of ΔW (``proj_delta``), of W (``proj_weight``) and random
    (``proj_random``), and ``amplification`` = ‖ΔW‖_F / proj_delta (inf when W has no component
    there). ``r`` defaults to ΔW's numerical rank."""
    W, delta = _matrix(W, "W"), _matrix(delta, "ΔW")
    if W.shape != delta.shape:
        raise LorazooError(f"W {tuple(W.shape)} and ΔW {tuple(delta.shape)} must have the same shape")
    rank = numerical_rank(delta)
    if r is None:
        if rank == 0:
            raise LorazooError("ΔW is zero (an untrained adapter?): it has no directions to compare with W")
        r = rank
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(W.shape):
        raise LorazooError(f"r must be an integer in [1, {min(W.shape)}] (the layer is {tuple(W.shape)}), got {r!r}")
    dtype = torch.promote_types(work(W).dtype, work(delta).dtype)
    Wd, Dd = work(W).to(dtype), work(delta).to(dtype)
    g = torch.Generator().manual_seed(seed)
    Ur = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, dtype=dtype)).Q
    Vr = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=dtype)).Q
    proj_delta = projection_norm(Wd, *_top(Dd, r))
    norm_delta = float(torch.linalg.matrix_norm(Dd))
    return {
        "r": r,
        "delta_rank": rank,
        "norm_weight": float(torch.linalg.matrix_norm(Wd)),
        "norm_delta": norm_delta,
        "proj_delta": proj_delta,
        "proj_weight": projection_norm(Wd, *_top(Wd, r)),
        "proj_random": projection_norm(Wd, Ur, Vr),
        "amplification": norm_delta / proj_delta if proj_delta > 0 else float("inf"),
    }
