"""Aurora (AuroRA, Dong et al. 2025 [72]): a tanh + B-spline layer (ANL) between LoRA's A and B.

Study Eq. 86-87 and 136-137: x_ANL = ANL(A x), update = s·B x_ANL, with ANL a fixed nonlinearity plus a
learnable B-spline one. The study's Eq. 86 writes tanh(tanh(M)) + V_s·S(M) and names an r x r matrix C
that the equation then omits. The authors' repository (github.com/ins1stenc3/AuroRA) could not be
read here; the two codes that reproduce its ANL agree, the study's own LoRAFactory
(``LinearWithAurora``) and the aurora-peft package (a refactor of the repository's ``ANL.py``), and put C
between the two tanh:

    ANL(z) = tanh(C tanh(z)) + V · Σ_j b(z_j),          z = A x ∈ R^r,

b(t) ∈ R^(G+p) the B-spline basis of degree p at t on a uniform grid of G intervals over
[-bound, bound], extended by p knots on each side (knots -bound + (i - p)·2·bound/G, i = 0..G+2p),
C (r, r), V (r, G+p). The basis vectors of the r coordinates are summed before V, as in the authors'
code (``b_splines(x).sum(dim=1)``), so V holds one spline per output coordinate, applied to the sum
of the bases of all input coordinates. Outside [t_0, t_last) the spline part is zero.

Defaults and init as in both codes: G = 5, p = 3, bound = 1, C xavier-normal, V uniform in
[-0.1, 0.1] (``scale_noise``), B zero. A as LoRA's (Kaiming-uniform, PEFT's default, which LoRAFactory
keeps; aurora-peft draws A xavier-normal instead). B = 0 makes the update
zero at init, so the model starts as the base although ANL(z) itself is not zero (C, V nonzero, and
the spline of 0 is not 0).

The basis is Cox-de Boor, vectorized over the grid (:func:`basis_first`), on the grid coordinate
u = (z - t_0)/h, where the uniform knots are the integers (so each level is a few elementwise ops, no
division by knot gaps), in at least float32. The whole ANL is one autograd function (:class:`_ANL`)
that keeps only z = A x and recomputes tanh and the basis in backward (the derivative of a degree-p
B-spline is the difference of two degree-(p-1) ones): the (tokens x r x (G+p)) intermediates are
never stored, and Aurora keeps for backward what LoRA does plus one (tokens x r) tensor.

Choices: the DropLoRA rank mask acts on ANL's output (the r values B reads), not on A x (see
forms/nonlinear.py). Not mergeable: some implementations offer a "static merge" B·ANL(A^T)^T for
inference, which is not the function the adapter computes, so lorazoo refuses merging instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import check_number
from ..registry import FORMS
from .autocast import promoted
from .nonlinear import HiddenNonlinear


def basis_first(u: torch.Tensor, pieces: int, order: int, with_lower: bool = False):
    """B-spline basis of degree ``order`` on the integer knots 0, 1, ..., ``pieces`` at every entry of u.

    Shape (pieces - order, *u.shape): the basis index first, so each level of the recursion works on
    contiguous blocks (a trailing basis dim of ~10 makes every elementwise op strided and ~10x
    slower on CPU). Cox-de Boor with t_i = i: with d_i = u - i,
    b_{i,0} = 1 if 0 <= d_i < 1 else 0, and b_{i,k} = (d_i·b_{i,k-1} + (k + 1 - d_i)·b_{i+1,k-1}) / k
    (the general recursion's (t - t_i)/(t_{i+k} - t_i) and (t_{i+k+1} - t)/(t_{i+k+1} - t_{i+1}) on unit
    spacing). A uniform grid t_i = t_0 + i·h maps onto it by u = (z - t_0)/h. With ``with_lower``,
    also the degree ``order - 1`` basis (pieces - order + 1, *u.shape) met on the way (None for order 0).
    """
    d = u - torch.arange(pieces, dtype=u.dtype, device=u.device).view(-1, *([1] * u.dim()))
    b = ((d >= 0) & (d < 1)).to(u.dtype)
    lower = None
    for k in range(1, order + 1):
        di = d[:pieces - k]
        lower, b = b, (di * b[:-1] + (k + 1 - di) * b[1:]) / k
    return (b, lower) if with_lower else b


def bspline_basis(u: torch.Tensor, pieces: int, order: int) -> torch.Tensor:
    """:func:`basis_first` with the basis index last: (*u.shape, pieces - order)."""
    return basis_first(u, pieces, order).movedim(0, -1)


def spline_sum(z: torch.Tensor, slope: float, offset: float, pieces: int, order: int) -> torch.Tensor:
    """Σ_j b(u_j), u = slope·z + offset, over the last dim of z (..., r) -> (..., pieces - order),
    computed in at least float32."""
    u = z.to(torch.promote_types(z.dtype, torch.float32)) * slope + offset
    return basis_first(u, pieces, order).sum(-1).movedim(0, -1)


class _ANL(torch.autograd.Function):
    """tanh(C tanh z) + V·Σ_j b(u(z_j)) per token, keeping only z, C, V for backward.

    Backward recomputes tanh z, tanh(C tanh z) and the basis from z (a few (tokens x r) passes), so
    autograd stores one (tokens x r) tensor instead of five. On unit knots
    d/du b_{i,p}(u) = b_{i,p-1}(u) - b_{i+1,p-1}(u), and du/dz = slope.
    """

    @staticmethod
    def forward(ctx, z, C, V, slope, offset, pieces, order):
        ctx.save_for_backward(z, C, V)
        ctx.consts = slope, offset, pieces, order
        spline = spline_sum(z, slope, offset, pieces, order).to(z.dtype)
        return torch.tanh(F.linear(torch.tanh(z), C)) + F.linear(spline, V)

    @staticmethod
    def backward(ctx, grad):
        z, C, V, grad = promoted(*ctx.saved_tensors, grad)  # under autocast: bf16 z and grad, float32 C, V
        slope, offset, pieces, order = ctx.consts
        r, n = C.shape[0], V.shape[1]
        t1 = torch.tanh(z)
        g_inner = grad * (1 - torch.tanh(F.linear(t1, C)).square())  # at C tanh z
        grad_C = g_inner.reshape(-1, r).mT @ t1.reshape(-1, r) if ctx.needs_input_grad[1] else None
        grad_z = F.linear(g_inner, C.mT) * (1 - t1.square())
        u = z.to(torch.promote_types(z.dtype, torch.float32)) * slope + offset
        basis, lower = basis_first(u, pieces, order, with_lower=True)  # degrees p and p - 1
        grad_V = None
        if ctx.needs_input_grad[2]:
            spline = basis.sum(-1).movedim(0, -1).to(z.dtype)
            grad_V = grad.reshape(-1, r).mT @ spline.reshape(-1, n)
        if order > 0:  # a degree-0 spline is piecewise constant
            g_spline = F.linear(grad, V.mT).to(u.dtype).movedim(-1, 0).unsqueeze(-1)  # (n, ..., 1)
            grad_z = grad_z + (((lower[:-1] - lower[1:]) * g_spline).sum(0) * slope).to(z.dtype)
        return grad_z, grad_C, grad_V, None, None, None, None


@FORMS.register("aurora", paper="AuroRA (Dong, Zhu, Song, Wang, 2025, 'Breaking Low-Rank Bottleneck of LoRA "
                "with Nonlinear Mapping') [72]",
                equations="study Eq. 86-87, 136-137; h = W0 x + s·B·ANL(A x), ANL(z) = tanh(C tanh z) + "
                "V·Σ_j b(z_j), b the B-spline basis (cubic, 5 intervals on [-1, 1] by default; authors' code)",
                summary="tanh + learnable B-spline layer (ANL) between A and B; B zero at init; not mergeable")
class Aurora(HiddenNonlinear):
    """h = W0 x + s·B(m ⊙ ANL(A x)), ANL(z) = tanh(C tanh z) + V·Σ_j b(z_j) (module docstring).

    Trainable: A (r, in), B (out, r), C (r, r), V (r, G + p). Options: ``aurora_grid_size`` G (5),
    ``aurora_spline_order`` p (3), ``aurora_grid_bound`` (1.0, the grid covers [-bound, bound]),
    ``aurora_spline_init`` (0.1, V uniform in [-init, init]).
    """

    options = {"aurora_grid_size": 5, "aurora_spline_order": 3, "aurora_grid_bound": 1.0,
               "aurora_spline_init": 0.1}

    @classmethod
    def validate(cls, opts):
        check_number("aurora_grid_size", opts["aurora_grid_size"], minimum=1, integer=True, maximum=1000)
        check_number("aurora_spline_order", opts["aurora_spline_order"], integer=True, maximum=10)
        check_number("aurora_grid_bound", opts["aurora_grid_bound"], strict=True)
        check_number("aurora_spline_init", opts["aurora_spline_init"])

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.grid_size = int(opts.get("aurora_grid_size", 5))
        self.order = int(opts.get("aurora_spline_order", 3))
        self.spline_init = float(opts.get("aurora_spline_init", 0.1))
        self.bound = float(opts.get("aurora_grid_bound", 1.0))
        self.C = nn.Parameter(torch.empty(rank, rank))
        self.V = nn.Parameter(torch.empty(rank, self.grid_size + self.order))
        self.reset_anl()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "V" in self._parameters:  # LoRA.__init__ calls this before C and V exist
            self.reset_anl()

    @torch.no_grad()
    def reset_anl(self) -> None:
        nn.init.xavier_normal_(self.C)
        nn.init.uniform_(self.V, -self.spline_init, self.spline_init)

    def grid_map(self) -> tuple[float, float]:
        """(slope, offset) of the grid coordinate u = (z - t_0)/h, t_0 = -bound - p·h, h = 2·bound/G,
        on which the knots are 0, 1, ..., G + 2p."""
        slope = self.grid_size / (2 * self.bound)
        return slope, self.bound * slope + self.order

    def spline(self, z: torch.Tensor) -> torch.Tensor:
        """Σ_j b(z_j), (..., r) -> (..., G + p), in at least float32 (no autograd through it)."""
        return spline_sum(z, *self.grid_map(), self.grid_size + 2 * self.order, self.order).to(z.dtype)

    def phi(self, z):
        return _ANL.apply(z, self.C, self.V, *self.grid_map(), self.grid_size + 2 * self.order, self.order)
