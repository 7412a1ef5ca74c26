"""Weight-SVD inits: PiSSA (principal components) and MiLoRA (minor components).

With the frozen weight W0 (out, in) = U S Vᵀ and the form's scale s, both set
B = U_k sqrt(S_k / s), A = sqrt(S_k / s) V_kᵀ for a chosen set k of r singular triplets, and move
that part out of the base: W0 <- W0 - s·B·A (through ``Adapter.shift_base``, so save/load and
delete reproduce and undo it). The model therefore starts exactly at the base model, with the
adapter holding s·B·A = U_k S_k V_kᵀ. The study writes Eq. 90-94 in the transposed convention
(y = x W, W in x out, A_0 on the input side); in torch's (out, in) layout its input-side factor is
our A = S_k^1/2 V_kᵀ and its output-side factor our B = U_k S_k^1/2.
The 1/s inside the root is PiSSA's own code (and PEFT's): it makes s·B·A, not B·A, the principal
part whatever alpha and r are.
"""
from __future__ import annotations

import torch

from ..parts import Init
from ..registry import INITS
from .calibration import work_dtype


def top_svd(matrix: torch.Tensor, k: int, niter: int = 0):
    """(U, S, V) with matrix ≈ U diag(S) Vᵀ for the k largest singular values, in at least float32.

    ``niter`` = 0: exact (torch.linalg.svd). ``niter`` > 0: randomized (torch.svd_lowrank with
    that many subspace iterations and 2k columns, oversampled for accuracy, then truncated to k).
    """
    m = matrix.to(work_dtype(matrix.dtype))
    if niter > 0:
        U, S, V = torch.svd_lowrank(m, q=min(2 * k, min(m.shape)), niter=niter)
    else:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        V = Vh.mT
    return U[:, :k], S[:k], V[:, :k]


@torch.no_grad()
def set_factors(adapter, weight: torch.Tensor, B_value: torch.Tensor, A_value: torch.Tensor,
                shift: bool) -> None:
    """Write B, A into the form's factors; with ``shift``, move s·B·A out of the base (W0 -= s·B·A)."""
    B, A = adapter.form.factors()
    if B.shape != B_value.shape or A.shape != A_value.shape:
        raise ValueError(f"init produced factors {tuple(B_value.shape)}, {tuple(A_value.shape)} for a form "
                         f"whose factors are {tuple(B.shape)}, {tuple(A.shape)}")
    B.copy_(B_value)
    A.copy_(A_value)
    if shift:  # with the stored (rounded) factors, so that base + s·B·A is W0 up to one rounding
        adapter.shift_base(weight, -adapter.form.scale * B.detach(), A.detach())
    adapter.form.after_factor_init(weight)


class SingularInit(Init):
    """Shared body of PiSSA and MiLoRA; subclasses pick which singular triplets."""

    def components(self, weight: torch.Tensor, r: int):
        raise NotImplementedError

    def apply(self, path, adapter, layer, weight):
        r = adapter.form.rank
        U, S, V = self.components(weight.detach(), r)
        root = (S / adapter.form.scale).sqrt()
        set_factors(adapter, weight, U * root, root[:, None] * V.mT, shift=True)


@INITS.register("pissa", paper="PiSSA (Meng et al., 2024) [26]",
                equations="study Eq. 90-92: W0 = U S Vᵀ, B = U_r S_r^1/2, A = S_r^1/2 V_rᵀ, base W0 - s·B·A",
                summary="principal singular components in the adapter, the residual in the frozen base")
class PiSSA(SingularInit):
    """PiSSA: the adapter holds the top-r singular part of W0, the base keeps the residual.

    Option ``pissa_niter``: 0 = exact SVD; n > 0 = randomized SVD with n subspace iterations
    (PiSSA's fast SVD, PEFT's ``pissa_niter_n``), much faster on large layers.
    """

    options = {"pissa_niter": 0}

    def components(self, weight, r):
        return top_svd(weight, r, self.spec.options["pissa_niter"])


@INITS.register("milora", paper="MiLoRA (Wang et al., 2024) [78]",
                equations="study Eq. 93-94: B = U[:, -r:] S^1/2, A = S^1/2 V[:, -r:]ᵀ, base W0 - s·B·A",
                summary="minor singular components in the adapter, the principal part stays frozen")
class MiLoRA(SingularInit):
    """MiLoRA: the adapter holds the r smallest singular triplets of W0 (of min(out, in)).

    Always an exact SVD: a randomized SVD finds the largest components, not the smallest.
    """

    def components(self, weight, r):
        n = min(weight.shape)
        U, S, V = top_svd(weight, n)
        return U[:, n - r:], S[n - r:], V[:, n - r:]
