"""NoRA (Lin, Li, Li, Zou, Xue, Guo, 2024, 'NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning
Large Models') [79]: an inner LoRA nested inside an outer pair taken from the SVD of W0.

What the sources say, and what was not available: the paper's abstract and summaries state that NoRA
"adopts a dual-layer nested structure with SVD", "freezes the outer LoRA weights and utilizes an
inner LoRA design" with "initialization guided by SVD" (arXiv 2408.10280; no official code was
released: "code will be released upon acceptance"). The paper's equations could not be read here.
The study's own code (LoRAFactory ``LinearWithNoRA``) sets the outer pair to the top-r singular
vectors, an inner product built from the square roots of the singular values, and moves the
initial update out of the base, PiSSA-like; it also trains the outer pair and takes column 1 of
diag(sqrt S) for a rank-1 inner pair, which read as slips (a frozen outer pair is the paper's
central claim). lorazoo implements the structure the abstract describes:

    ΔW = s · U_r (B_i A_i) V_rᵀ,    U_r (out, r), V_rᵀ (r, in) frozen (buffers, saved with the adapter);
                                     B_i (r, r'), A_i (r', r) trainable, r' = ``nora_inner_rank``,

with W0 = U S Vᵀ and r = the spec's rank (the outer, SVD rank). Two inits:

- init ``nora`` (the preset; the study's reading of "initialization guided by SVD"): the inner pair
  holds the top r' singular values, B_i = [diag sqrt(S_r'/s); 0], A_i = [diag sqrt(S_r'/s), 0], so
  s·ΔW = U_r' S_r' V_r'ᵀ, which is moved out of the base (W0 - U_r' S_r' V_r'ᵀ, through
  ``Adapter.shift_base``): the model starts as the base and the inner LoRA starts on the principal
  part, as PiSSA but within the fixed principal r-subspace.
- init ``default``: the outer pair from the SVD of W0 (computed in ``after_factor_init``), the inner
  pair as LoRA (A_i Kaiming-uniform, B_i zero): zero update, base untouched.

Choices: r' defaults to r (``nora_inner_rank=0``): the paper's inner rank could not be read, and the
study's 1 looks like the indexing slip above; any 1 <= r' <= r may be set. Trainable parameters per
layer: 2·r·r' (vs LoRA's r·(in + out)). The DropLoRA rank mask acts on the r' inner activations
(between A_i and B_i). No plain factors: PiSSA-like factor inits, LoRA-Pro and ReLoRA are refused;
LoRA+ speeds up B_i. Mergeable: ΔW is s·U_r B_i A_i V_rᵀ. Cost per token: r·(in + out) + 2·r·r'
multiply-adds, LoRA's plus 2·r·r'.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..inits.svd import top_svd
from ..parts import Form, check_number
from ..registry import FORMS


@FORMS.register("nora", paper="NoRA (Lin et al., 2024, 'NoRA: Nested Low-Rank Adaptation for Efficient "
                "Fine-Tuning Large Models') [79]",
                equations="ΔW = s·U_r (B_i A_i) V_rᵀ: outer U_r, V_r from the SVD of W0, frozen; inner B_i (r, r'), "
                "A_i (r', r) trainable",
                summary="inner trainable LoRA nested in a frozen outer pair of top-r singular vectors of W0")
class NoRA(Form):
    """h = W0 x + s·U_r B_i (m ⊙ A_i V_rᵀ x) (module docstring)."""

    options = {"nora_inner_rank": 0}
    plain_product = False
    up_params = ("B_inner",)
    rank_bound = "r' (the inner rank)"

    @classmethod
    def validate(cls, opts):
        check_number("nora_inner_rank", opts["nora_inner_rank"], integer=True)

    @classmethod
    def check_spec(cls, spec):
        inner = int(spec.options.get("nora_inner_rank", 0))
        if spec.form == cls.part_name and inner > spec.rank:
            raise SpecError(f"nora_inner_rank ({inner}) must be at most the outer rank r = {spec.rank} "
                            f"(0 means r)")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.outer_rank = rank
        self.rank = inner = min(int(opts.get("nora_inner_rank", 0)) or rank, rank)  # rank masks act on r'
        self.register_buffer("U", torch.zeros(out_features, rank))   # outer B, frozen
        self.register_buffer("Vt", torch.zeros(rank, in_features))   # outer A, frozen
        self.A_inner = nn.Parameter(torch.empty(inner, rank))
        self.B_inner = nn.Parameter(torch.empty(rank, inner))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A_inner, a=math.sqrt(5))
        nn.init.zeros_(self.B_inner)

    @torch.no_grad()
    def set_outer(self, weight: torch.Tensor) -> torch.Tensor:
        """U_r, V_rᵀ from the SVD of ``weight``; returns the top-r singular values."""
        U, S, V = top_svd(weight.detach(), self.outer_rank)
        self.U.copy_(U)
        self.Vt.copy_(V.mT)
        return S

    @torch.no_grad()
    def after_factor_init(self, weight):
        if not self.U.any():  # the default init: outer pair from W0, inner as LoRA (zero update)
            self.set_outer(weight)

    def inner(self, mask=None) -> torch.Tensor:
        """B_i diag(m) A_i, (r, r)."""
        return (self.B_inner if mask is None else self.B_inner * mask) @ self.A_inner

    def forward(self, x, y, weight, mask=None):
        h = self.rank_masked(F.linear(F.linear(x, self.Vt), self.A_inner), mask) * self.scale  # (..., r')
        return y + F.linear(F.linear(h, self.B_inner), self.U)

    def delta_weight(self, weight):
        return self.scale * (self.U @ self.inner() @ self.Vt)
