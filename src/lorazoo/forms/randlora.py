"""RandLoRA: a full-rank update from shared frozen random bases and trainable diagonal scalings
(Albert et al., ICLR 2025 [23]; study Eq. 31-32).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_number
from ..registry import FORMS
from .autocast import promoted


def n_bases(min_dim: int, rank: int, bound: int) -> int:
    """Study Eq. 31: n = ceil(min(d, U) / b), U = 0 meaning no bound (the paper: full rank)."""
    d = min(min_dim, bound) if bound else min_dim
    return math.ceil(d / rank)


class RandLoraBank(nn.Module):
    """Frozen random bases shared by every layer of one adapter: A (b, D_min), one basis for all
    terms, and B (D_max, n, b), n bases; D_min/D_max the smaller/larger of the largest in and out
    over the targets, n enough for the widest layer (Eq. 31). As the authors' code: uniform entries
    normalized to unit standard deviation (their Kaiming draw divided by its std), from a generator
    seeded with the spec's seed; buffers, so state_dict and save/load hold them once.
    """

    def __init__(self, rank: int, max_in: int, max_out: int, bound: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        lo, hi = min(max_in, max_out), max(max_in, max_out)
        A = torch.empty(rank, lo).uniform_(-1, 1, generator=g)
        B = torch.empty(hi, n_bases(lo, rank, bound), rank).uniform_(-1, 1, generator=g)
        self.register_buffer("A", A / A.std())
        self.register_buffer("B", B / B.std())


def scaled_basis(A: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
    """S[i] = diag(λ_i) A diag(γ_i): (n, b, m) from A (b, m), λ (n, b), γ (n, m)."""
    return lam[:, :, None] * A[None] * gam[:, None, :]


class ScaledBasis(torch.autograd.Function):
    """S[i] = diag(λ_i) A diag(γ_i) for all i at once, (n, b, m); saves A, λ, γ, not λ⊗A.

    The authors' memory-efficient ``UniqueBaseGrad``, written for lorazoo's (n, b) layout of λ.
    """

    @staticmethod
    def forward(ctx, A, lam, gam):
        ctx.save_for_backward(A, lam, gam)
        return scaled_basis(A, lam, gam)

    @staticmethod
    def backward(ctx, grad):
        A, lam, gam, grad = promoted(*ctx.saved_tensors, grad)
        g_lam = torch.einsum("ibm,bm,im->ib", grad, A, gam) if ctx.needs_input_grad[1] else None
        g_gam = torch.einsum("ibm,bm,ib->im", grad, A, lam) if ctx.needs_input_grad[2] else None
        return None, g_lam, g_gam


class RandLoraDelta(torch.autograd.Function):
    """The update applied to x, Bf (S x) (or S^T (Bf^T x) when the output is the smaller side), with
    S = ScaledBasis(A, λ, γ) (n·b, m) rebuilt in backward rather than kept: only x (which the
    base layer keeps anyway), the frozen bases and λ, γ are saved, plus (output side) the
    (tokens x n·b) projection Bf^T x that the gradient of S needs."""

    @staticmethod
    def forward(ctx, x, A, lam, gam, Bf, input_side):
        S = scaled_basis(A, lam, gam).flatten(0, 1)
        if input_side:
            ctx.save_for_backward(x, A, lam, gam, Bf)
            out = F.linear(F.linear(x, S), Bf)
        else:
            h = F.linear(x, Bf.t())
            ctx.save_for_backward(h, A, lam, gam, Bf)
            out = F.linear(h, S.t())
        ctx.input_side = input_side
        return out

    @staticmethod
    def backward(ctx, g):
        t, A, lam, gam, Bf, g = promoted(*ctx.saved_tensors, g)
        S = scaled_basis(A, lam, gam).flatten(0, 1)
        g2, t2 = g.flatten(0, -2), t.flatten(0, -2)
        if ctx.input_side:  # t = x; out = (x S^T) Bf^T
            gh = g @ Bf
            grad_x = gh @ S if ctx.needs_input_grad[0] else None
            grad_S = gh.flatten(0, -2).t() @ t2
        else:  # t = h = x Bf; out = h S
            grad_x = (g @ S.t()) @ Bf.t() if ctx.needs_input_grad[0] else None
            grad_S = t2.t() @ g2
        grad_S = grad_S.view(lam.shape[0], lam.shape[1], -1)
        g_lam = torch.einsum("ibm,bm,im->ib", grad_S, A, gam) if ctx.needs_input_grad[2] else None
        g_gam = torch.einsum("ibm,bm,ib->im", grad_S, A, lam) if ctx.needs_input_grad[3] else None
        return grad_x, None, g_lam, g_gam, None, None


@FORMS.register("randlora", paper="RandLoRA (Albert et al., ICLR 2025) [23]",
                equations="study Eq. 31-32: n = ceil(min(d, U)/b); ΔW = (s/√n) Σ_i B_i Λ_i A Γ_i, "
                          "B_i, A shared, frozen, random; Λ_i, Γ_i trainable diagonals",
                summary="full-rank update: n shared frozen random rank-b bases, each with trainable "
                        "diagonal scalings Λ_i (b) and Γ_i (min(in, out)); optional bound U on n·b")
class RandLoRA(Form):
    """ΔW = (s/√n) Σ_{i=1..n} B_i diag(λ_i) A diag(γ_i), on the layer's smaller side m = min(in, out).

    The rank is b, the rank of each random basis; n = ceil(min(m, U)/b) (Eq. 31, ``randlora_bound``
    U, 0 = no bound), so n·b >= m and the sum reaches full rank m (the paper's claim) unless U < m,
    where the rank is at most n·b. U is the study's own knob (Sec. IV-C4, "the upper bound of the
    dimension of all low-rank bases ... 1024, resulting in a maximum rank of 1024"; LoRAFactory
    sizes its bank with min(max_in, max_out, 1024)): it caps n·b, hence the rank and the cost. A (b, m) and B_i (M, b), M = max(in, out), are slices of the
    shared frozen bank (one A for every term, as the authors' code); γ_i acts on A's m side. When
    in <= out, ΔW = (s/√n) Σ B_i Λ_i A Γ_i (out, in); when out < in the same product of the
    layer's (in, out) sizes is transposed, as the authors do, so the trainable Γ always sits on the
    smaller side (fewer parameters).

    Trainable per layer: λ (n, b), zero (so ΔW = 0 at init, the authors' ``reset``), and γ (n, m),
    1/M. Scale: s/√n as the authors' ``alpha / r / sqrt(n)`` with s = α/r from the scale part;
    the study's Eq. 32 writes 2/√n, i.e. ``scale="constant", alpha=2`` (the preset).

    Forward (``RandLoraDelta``): S = [diag(λ_i) A diag(γ_i)]_i (n·b, m) is formed once per call,
    never per token and never the (out, in) update, and rebuilt in backward instead of kept; then
    x -> S x -> Bf (S x) (or the transposed order): n·b·(in + out) multiply-adds per token, about
    (in + out)/max(in, out) times the dense update's in·out since n·b ~ m: a full-rank update
    cannot cost less per token. The study bounds U = 1024 to keep n·b small on wide layers.
    Memory: beyond x (kept by the base layer anyway) only layers whose output is the smaller side
    keep the (tokens x n·b) projection Bf^T x, which the gradient of S needs.

    Choices: n is the layer's own (the authors' PEFT code), not the global n of LoRAFactory, so a
    small layer gets no redundant bases; with U at most every layer's m the two agree. Pairing:
    B_i is B[:, i, :], matched with λ_i (the authors' flattening pairs B's (n, b) columns with
    S's (b, n) rows, a fixed permutation of independent random columns: equal in distribution).
    Rank dropout is refused: the update has no low-rank dimension to drop.
    """

    options = {"randlora_bound": 0}
    has_rank = False
    rank_bound = "min(in, out, ceil(min(in, out, U)/b)·b)"
    up_params = ("lam",)  # LoRA+: the zero-init coefficients, in B's place

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.bound = int(opts.get("randlora_bound", 0))
        self.bank_key = f"randlora_r{rank}"
        self.use_bank(ctx, self.bank_key,
                      lambda: RandLoraBank(rank, ctx.max_in, ctx.max_out, self.bound, ctx.seed))
        self.m, self.M = min(in_features, out_features), max(in_features, out_features)
        self.input_side = in_features <= out_features  # Γ and A act on the input
        self.n = n_bases(self.m, rank, self.bound)
        self.lam = nn.Parameter(torch.empty(self.n, rank))
        self.gam = nn.Parameter(torch.empty(self.n, self.m))
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_number("randlora_bound", opts["randlora_bound"], integer=True)

    @classmethod
    def max_rank(cls, in_features, out_features):
        return max(in_features, out_features)  # past min(in, out) a basis rank only wastes bases

    @property
    def bank(self) -> RandLoraBank:
        return getattr(self, f"_bank_{self.bank_key}")

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.lam.zero_()
            self.gam.fill_(1.0 / self.M)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bf (M, n·b), S (n·b, m)) with Σ_i B_i Λ_i A Γ_i · s/√n = Bf @ S."""
        bank = self.bank
        Bf = bank.B[: self.M, : self.n].reshape(self.M, self.n * self.rank)
        S = ScaledBasis.apply(bank.A[:, : self.m], self.lam, self.gam * (self.scale / math.sqrt(self.n)))
        return Bf, S.reshape(self.n * self.rank, self.m)

    def forward(self, x, y, weight, mask=None):
        bank = self.bank
        Bf = bank.B[: self.M, : self.n].reshape(self.M, self.n * self.rank)
        gam = self.gam * (self.scale / math.sqrt(self.n))
        return y + RandLoraDelta.apply(x, bank.A[:, : self.m], self.lam, gam, Bf, self.input_side)

    def delta_weight(self, weight):
        Bf, S = self.bases()
        dW = Bf @ S
        return dW if self.input_side else dW.t()
