"""LoRMA: low-rank multiplicative adaptation (Bihany, Patel, Modi; papers/lorma.txt).

The adapted weight is M·W0 with M a (d, d) matrix built from B (d, r) and A (r, d), d = out
features: Eq. 6 (no inflation) M = s·BA; Eq. 8 (additive inflation) M = s·BA + I; Eq. 7 and
Sec. 3.2.1 (permutation inflation) M = s·I_pi(BA) (s as in the authors' code; Eq. 7 is s = 1). The forms are multiplicative: their input is
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


def pi_apply_fft(B: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """I_pi(B A)·y for every row of ``y`` (..., d) without forming the (d, d) matrix.

    Row i of I_pi(BA) times y is sum_k B[i, k] · sum_c A[k, c] y[(i + c) mod d]: for each k a
    circular cross-correlation of y with A's row k, weighted by B's column k. By FFT that is one
    rfft of y and r irffts per row, O(r·d·log d) instead of O(d²). Exact up to float rounding.
    """
    d = y.shape[-1]
    compute = torch.promote_types(y.dtype, torch.float32)  # torch.fft has no bfloat16
    Yf = torch.fft.rfft(y.to(compute), dim=-1)
    Af = torch.fft.rfft(A.to(compute), dim=-1).conj()
    corr = torch.fft.irfft(Yf.unsqueeze(-2) * Af, n=d, dim=-1)  # (..., r, d)
    return (corr * B.to(compute).T).sum(-2).to(y.dtype)


@FORMS.register("lorma_pi", paper="LoRMA (Bihany et al., 2025)",
                equations="LoRMA Eq. 7, Sec. 3.2.1: W' = s·I_pi(BA)·W0, row i of BA rotated by i",
                summary="multiplicative update with permutation rank inflation; identity at init")
class LoRMAPi(_LoRMA):
    """h = s·I_pi(B diag(M) A)·(W0 x)  (LoRMA Eq. 7; I_pi rotates row i of BA right by i).

    Init (Sec. 3.2.1): B's first column ones, the rest random (Kaiming-uniform); A[0, 0] = 1,
    the rest zero; then BA has ones in column 0 and zeros elsewhere, and I_pi(BA) = I.

    Scale, as the authors' code (Exploration-Lab/LoRMA, ``LormaLinear_pi``, do_pi=True):
    Eq. 7 has no s, but their code multiplies I_pi(BA) by s = alpha/r and divides both init
    factors by sqrt(s), so that s·I_pi(BA) = I at the start (within one rounding when s is not
    a power of 4). s changes the training dynamics, not the span: each Adam step moves M
    sqrt(s) times further. The paper trains LoRMA-pi with alpha = r (s = 1, Table 14).

    Cost: M·y is computed either by forming M once per forward (O(d²·(r + tokens)), BLAS
    matmuls) or row by row as r circular correlations by FFT (O(r·d·log d) per token, see
    :func:`pi_apply_fft`); the FFT is chosen for d >= ``fft_min_features``, below which the dense
    matmul is faster on CPU: the r + 1 transforms per token and the (tokens, r, d) intermediates
    cost more than one BLAS row of d² multiply-adds until d is a few thousand (measured, forward +
    backward, r = 8, one thread, 512 tokens: d = 512 dense 12-47 ms, FFT 40-80 ms; d = 1376 dense
    308 ms, FFT 491 ms; 1024 tokens: d = 2048 dense 258 ms, FFT 442 ms; d = 4096 dense 1389 ms,
    FFT 580 ms). On a GPU the crossover may be lower; it was not measured.
    With input dropout, h = y + (M - I)·drop(y), so the dropout falls on the update only.
    """

    rank_bound = "full"
    fft_min_features = 3072  # the dense/FFT crossover measured on CPU (see the docstring)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        nn.init.zeros_(self.A)
        with torch.no_grad():
            self.B[:, 0] = 1.0
            self.A[0, 0] = 1.0
            if self.scale != 1:
                self.B.div_(math.sqrt(self.scale))
                self.A.div_(math.sqrt(self.scale))

    def matrix(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        M = inflate_pi(self.rank_masked(self.B, mask) @ self.A)
        return M if self.scale == 1 else M * self.scale

    def apply_matrix(self, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """M·v over the last dimension of ``v``, by the faster exact method for this size."""
        if v.shape[-1] < self.fft_min_features:
            return v @ self.matrix(mask).T
        out = pi_apply_fft(self.rank_masked(self.B, mask), self.A, v)
        return out if self.scale == 1 else out * self.scale

    def forward(self, x, y, weight, mask=None):
        if x is y:
            return self.apply_matrix(y, mask)
        return y + self.apply_matrix(x, mask) - x  # y + (M - I)·drop(y)
