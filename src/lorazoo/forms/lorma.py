"""LoRMA: low-rank multiplicative adaptation (Bihany, Patel, Modi; papers/lorma.txt).

The adapted weight is M·W0 (pre-multiplication, the paper's setting) with M a (d, d) matrix built
from B (d, r) and A (r, d), d = out features: Eq. 6 (no inflation) M = s·BA; Eq. 8 (additive
inflation) M = s·BA + I; Eq. 7 and Sec. 3.2.1 (permutation inflation) M = s·I_pi(BA) (s as in the
authors' code; Eq. 7 is s = 1). In this order the forms are multiplicative: their input is the
(dropped-out) base output W0 x, so ``M W0 x`` is computed as ``M (W0 x)`` (Table 11 order).
The DropLoRA rank mask acts between A and B.

Option ``lorma_order`` ("pre", default; "post"): post-multiplication W' = W0·M (Sec. 5.3, Table 7,
Corollary 1.2), with M a (d, d) multiplier over d = in features (B (d_in, r), A (r, d_in), rank
at most d_in), so h = W0 (M x) + b. The multiplier then acts on x before W0, so the layer's base
output W0 x cannot be reused as its input (Table 11's cheap order is a pre-multiplication one):
its result has to go through W0 again. The rank-r forms use associativity instead: W0·s·B(A x) =
s·(W0 B)(A x), with W0 B (d_out, r) formed once per forward (d_out·d_in·r multiply-adds, and as
many in backward for B's gradient, independent of the number of tokens), then LoRA's r·(d_in +
d_out) per token; computing W0·(s·B(A x)) token by token would cost d_out·d_in per token, more as
soon as there are more tokens than r. LoRMA-pi's multiplier is full rank: (M - I) x costs d_in²
per token (or the FFT's r·d_in·log d_in) plus one extra pass through W0, d_out·d_in per token.
A post form reads x, not W0 x: it is not ``multiplicative`` in the layer's sense, so each
instance sets the layer flags from the option (see :class:`_LoRMA`); the classes keep
``multiplicative = True``, so parts that refuse LoRMA by class (LoRA-FA, LoRA-Pro, ReLoRA...)
refuse either order. Input dropout falls where it does in pre order, on the multiplier's input:
x instead of W0 x. The weight a post form multiplies is the layer's current weight (base plus
merged adapters), as for DoRA; an earlier, unmerged adapter on the same layer is not inside it.
The paper trains post-multiplicative LoRMA+ only (Table 7); post LoRMA and LoRMA-pi follow the
same equations with the multiplier on the right.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorazooError
from ..parts import Form, check_choice
from ..registry import FORMS
from .lora import LoRA

ORDERS = ("pre", "post")


def inflate_pi(P: torch.Tensor) -> torch.Tensor:
    """I_pi (LoRMA Sec. 3.2.1): row i of the square ``P`` rotated cyclically right by i.

    I_pi(P)[i, j] = P[i, (j - i) mod d]. Built with one concatenation and views (no index
    tensor): in [P P] flattened, entry (i, j) sits at d + i·(2d - 1) + j.
    """
    d = P.shape[0]
    flat = torch.cat([P, P], dim=1).reshape(-1)
    return flat[d:d + d * (2 * d - 1)].reshape(d, 2 * d - 1)[:, :d]


class _LoRMA(LoRA):
    """Shared LoRMA pieces: B (d, r), A (r, d) over d = out (pre) or in (post) features, the
    order's product with W0 (M·W0 or W0·M), merge and unmerge.

    Reuses LoRA's tensors, init (A Kaiming-uniform, B zero) and low-rank product
    ``delta(v) = s·B(mask ⊙ A v)``, applied to v = W0 x (pre) or to x and followed by W0 (post).
    The factors are (d, d), not the (out, in) update, so inits that set plain B·A factors
    (PiSSA...) are refused.

    Post order flags (set per instance, shadowing the class's): ``multiplicative = False`` (the
    layer then hands the form the dropped-out x, not W0 x) and ``reads_output =
    post_reads_output``: True for a form whose output replaces y (plain LoRMA: the layer then
    adds the bias after it), False for those that add to y (the bias stays in the base matmul).
    """

    multiplicative = True
    reads_output = True
    post_reads_output = False
    factors = Form.factors  # no plain additive B·A of the weight's shape
    options = {"lorma_order": "pre"}

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        post = opts.get("lorma_order", "pre") == "post"
        d = in_features if post else out_features
        super().__init__(d, d, rank, scale, opts, ctx)  # A: (r, d), B: (d, r)
        self.in_features, self.out_features = in_features, out_features
        self.post = post
        if post:
            self.multiplicative = False
            self.reads_output = self.post_reads_output
        self.register_buffer("merged_from", None, persistent=False)  # see merge()

    @classmethod
    def validate(cls, opts):
        check_choice("lorma_order", opts["lorma_order"], ORDERS)

    @classmethod
    def max_rank(cls, in_features, out_features):
        return out_features  # B A is (out, out) in the default (pre) order

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        return in_features if opts.get("lorma_order", "pre") == "post" else out_features

    def matrix(self) -> torch.Tensor:
        """The (d, d) multiplier M with W' = M·W0 (pre) or W0·M (post)."""
        raise NotImplementedError

    # --- the order: where W0 stands relative to M -------------------------------------------
    def through_base(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What follows the multiplier in the forward: nothing (pre: v is already in the output
        space, M acted on W0 x) or W0 (post: W0 v)."""
        return F.linear(v, weight) if self.post else v

    def low_rank(self, v: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """s·B(mask ⊙ A v) (pre, v = W0 x), or W0·s·B(mask ⊙ A v) computed as s·(W0 B)(mask ⊙ A v)
        (post, v = x): W0 B (out, r) once per forward instead of W0 once per token."""
        if not self.post:
            return self.delta(v, mask)
        return F.linear(self.rank_masked(F.linear(v, self.A), mask) * self.scale, weight @ self.B)

    def low_rank_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """s·BA·W0 (pre) or s·W0·BA (post), never forming the (d, d) product."""
        if self.post:
            return ((weight @ self.B) @ self.A) * self.scale
        return (self.B @ (self.A @ weight)) * self.scale

    def times(self, M: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """M·W0 (pre) or W0·M (post)."""
        return weight @ M if self.post else M @ weight

    def delta_weight(self, weight):
        return self.times(self.matrix(), weight) - weight

    def merge(self, weight):
        """W' = M·W0 (pre) or W0·M (post). Unmerge solves M W = W' (or W M = W'); a form whose M
        is singular caches W0 instead."""
        acc = torch.promote_types(weight.dtype, torch.float32)
        return self.times(self.matrix().to(acc), weight.to(acc)).to(weight.dtype)

    def unmerge(self, merged):
        acc = torch.promote_types(merged.dtype, torch.float32)
        M = self.matrix().to(acc)
        W, info = torch.linalg.solve_ex(M, merged.to(acc), left=not self.post)
        if info.item() != 0:
            raise LorazooError(f"cannot unmerge '{self.part_name}': its multiplier M is singular; "
                               f"reload the base weights and the saved adapter instead")
        return W.to(merged.dtype)


@FORMS.register("lorma", paper="LoRMA (Bihany et al., 2025)", equations="LoRMA Eq. 6: W' = s·BA·W0",
                summary="multiplicative low-rank update without rank inflation (ablation, Table 6)")
class LoRMA(_LoRMA):
    """h = s·B(M ⊙ A (W0 x))  (LoRMA Eq. 6, Table 11 order: cost 2·d·r per token); post order
    h = s·(W0 B)(M ⊙ A x), W' = s·W0·BA.

    Rank(W') <= r, and W' cannot equal W0 (rank d), so it does not start from the base model;
    the init is LoRMA+'s (B zero, A Kaiming-uniform), as in the paper's Table 6 ablation where
    everything but the inflation is kept the same: the adapted layer outputs only its bias at
    the start. Merge keeps a copy of W0 for unmerge, since M = s·BA is singular.
    """

    zero_init = False
    post_reads_output = True  # its output replaces y: the layer adds the bias after it

    def forward(self, x, y, weight, mask=None):
        return self.low_rank(x, weight, mask)

    def matrix(self):
        return (self.B @ self.A) * self.scale

    def delta_weight(self, weight):
        return self.low_rank_weight(weight) - weight

    def merge(self, weight):
        self.merged_from = weight.detach().clone()
        return self.low_rank_weight(weight)

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
    ΔW = s·BA·W0 is at most r; the multiplier s·BA + I has rank >= d - r. Post order (Table 7):
    h = W0 x + s·(W0 B)(M ⊙ A x), W' = W0·(s·BA + I), ΔW = s·W0·BA.
    """

    def forward(self, x, y, weight, mask=None):
        return y + self.low_rank(x, weight, mask)

    def matrix(self):
        M = (self.B @ self.A) * self.scale
        return M + torch.eye(M.shape[0], dtype=M.dtype, device=M.device)

    def delta_weight(self, weight):
        return self.low_rank_weight(weight)

    def update_factors(self, weight):
        """Post order: ΔW = s·W0·BA = (s·W0 B)·A, rank r, for per-sample serving (lorazoo.mixed).
        Pre order: None (the form transforms the output; mixed serving refuses it)."""
        return ((weight @ self.B) * self.scale, self.A) if self.post else None


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

    Post order: h = W0 x + W0·(M - I)·x, W' = W0·s·I_pi(BA), with (M - I)·x by the same two
    methods over d = in features (the form cannot tell whether x was dropped out, so it always
    adds the update to y; with M = I exactly, as at init with s = 1, the output is exactly y).
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
        if x is y and not self.post:  # pre order without dropout: M·y
            return self.apply_matrix(y, mask)
        return y + self.through_base(self.apply_matrix(x, mask) - x, weight)  # y + (M - I)·drop(·)
