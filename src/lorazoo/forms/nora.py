"""NoRA (Lin, Li, Li, Zou, Xue, Guo, 2024, 'NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning
Large Models', arXiv 2408.10280) [79]: a trainable inner LoRA nested inside a frozen outer pair
taken from the SVD of W0.

Sources. The arXiv paper's equations could not be read here (only its abstract: "a dual-layer nested
structure with SVD", "freezes the outer LoRA weights and utilizes an inner LoRA design"). The
authors' code is github.com/lliai/LoRA-Zoo (Lujun Li, a co-author; the ICCV 2025 version of the
paper, CLIP experiments), ``nora/loralib/lora_lib.py``. It holds ablation layers, not one final
layer: ``NoRALinear_B`` (frozen outer pair, several inner structures) and ``NoRALinear_C``, the run
of "W_a set to a LoRA" (main_NoRA_C.py: "table C ... because of NoRA's nature, NoRA's inner r
must be enlarged"), which is the abstract's "inner LoRA design" and what lorazoo implements:

    NoRALinear_C:  outer rank R = floor(0.8 · min(in, out));  (U, S, Vh) = svd(W')[:R]
                   lora_A = U diag(S) (frozen),  lora_B = Vh (frozen)      (init_method '1', default)
                   W_a = a1 (R, 16) · a2 (16, R) (trainable),  update = (alpha/R) · lora_A a1 a2 lora_B

In lorazoo's (out, in) convention, with W0 = U S Vᵀ:

    ΔW = s · (U_R S_R) B_i A_i V_Rᵀ,   U_R S_R (out, R) and V_Rᵀ (R, in) frozen buffers (saved with
                                       the adapter); B_i (R, r), A_i (r, R) trainable, r = the rank,
    R = ``nora_outer_rank``, or floor(``nora_outer_ratio`` · min(in, out)) when it is 0 (default
    0.8, the authors' rule); R is raised to r where that is larger.

Choices where the authors' code is unclear or differs:

- The spec's rank is the inner rank r (the trainable LoRA; rank masks act on it). The authors fix
  it at 16 (hard-coded); lorazoo keeps the catalogue's rank (preset: the study's r).
- The outer pair comes from the SVD of W0 itself. The authors take it from W' = W0·S_a with an
  activation scaling S_a = diag(mean|x|^a) (ASVD, from a calibration batch) and multiply S_a⁻¹ back
  in on the wrong side for non-square weights (their layers are square); the activation scaling is
  left out (lorazoo's calibration pass collects no mean |x|). S_R stays in the left factor, as
  their default init_method '1'.
- The inner pair starts as LoRA (A_i Kaiming-uniform, B_i zero), so ΔW = 0 and the model starts as
  the base; the base is not shifted (as the authors). The authors' NoRALinear_C leaves a1, a2 at
  ``torch.randn`` (a nonzero start), which the abstract's "inner LoRA" and the contract rule out.
- s is the spec's scale for the inner rank (alpha/r); the authors' code divides by the outer rank
  (scaling = lora_alpha / R with lora_alpha = 1), a per-layer constant r/R that acts as a
  learning-rate factor.
- Not the study's LinearWithNoRA (LoRAFactory): it trains the outer pair and builds a rank-1 inner
  from column 1 of diag(sqrt S), which contradicts the frozen outer pair of the abstract and code.

Cost. The forward forms Â = A_i V_Rᵀ (r, in) and B̂ = U_R S_R B_i (out, r) once per call
(r·R·(in + out) multiply-adds, independent of the token count) and then runs LoRA's per-token path
y + s·B̂(m ⊙ Â x): per token exactly LoRA's r·(in + out), so the extra work per step relative to
LoRA's adapter work is R / (tokens per step), small once a step holds many more tokens than R. The
frozen outer pair is R·(in + out) values per layer (1.6 x the layer's weight for a square one at
ratio 0.8): this is the method's own memory (the authors store it as frozen parameters), above
LoRA's; ``nora_outer_rank`` bounds it. Measured (``lorazoo bench``, hidden 512, 512 tokens per step,
R = 409, CPU, 1 thread): step 1.22 x LoRA, peak memory 1.44 x LoRA, 0.59 x LoRA's trainable
parameters. Trainable parameters per layer: 2·R·r. Mergeable: ΔW = B̂ Â·s. No plain factors: PiSSA-like
factor inits, LoRA-Pro and ReLoRA are refused; LoRA+ speeds up B_i.
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


def outer_rank(in_features: int, out_features: int, rank: int, opts) -> int:
    """R: ``nora_outer_rank``, or floor(ratio · min(in, out)); at least the inner rank, at most min(in, out)."""
    cap = min(in_features, out_features)
    fixed = int(opts.get("nora_outer_rank", 0))
    R = fixed if fixed > 0 else math.floor(float(opts.get("nora_outer_ratio", 0.8)) * cap)
    return min(max(R, rank), cap)


@FORMS.register("nora", paper="NoRA (Lin et al., 2024, 'NoRA: Nested Low-Rank Adaptation for Efficient "
                "Fine-Tuning Large Models') [79]",
                equations="ΔW = s·(U_R S_R) B_i A_i V_Rᵀ: outer pair from the SVD of W0 (R = 0.8·min(in, out)), "
                "frozen; inner LoRA B_i (R, r), A_i (r, R) trainable (authors' NoRALinear_C)",
                summary="trainable inner LoRA nested in a frozen outer pair of top-R singular vectors of W0")
class NoRA(Form):
    """h = W0 x + s·(U_R S_R B_i)(m ⊙ (A_i V_Rᵀ) x) (module docstring)."""

    options = {"nora_outer_ratio": 0.8, "nora_outer_rank": 0}
    plain_product = False
    up_params = ("B_inner",)
    rank_bound = "r (the inner rank)"

    @classmethod
    def validate(cls, opts):
        check_number("nora_outer_ratio", opts["nora_outer_ratio"], strict=True, maximum=1)
        check_number("nora_outer_rank", opts["nora_outer_rank"], integer=True)

    @classmethod
    def check_spec(cls, spec):
        outer = int(spec.options.get("nora_outer_rank", 0))
        if spec.form == cls.part_name and 0 < outer < spec.rank:
            raise SpecError(f"nora_outer_rank ({outer}) must be at least the inner rank r = {spec.rank} "
                            f"(0: floor(nora_outer_ratio · min(in, out)))")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.outer_rank = R = outer_rank(in_features, out_features, rank, opts)
        self.register_buffer("U", torch.zeros(out_features, R))    # U_R S_R, frozen
        self.register_buffer("Vt", torch.zeros(R, in_features))    # V_Rᵀ, frozen
        self.A_inner = nn.Parameter(torch.empty(rank, R))
        self.B_inner = nn.Parameter(torch.empty(R, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A_inner, a=math.sqrt(5))
        nn.init.zeros_(self.B_inner)

    @torch.no_grad()
    def set_outer(self, weight: torch.Tensor) -> None:
        """U_R S_R and V_Rᵀ from the SVD of ``weight`` (out, in)."""
        U, S, V = top_svd(weight.detach(), self.outer_rank)
        self.U.copy_(U * S)
        self.Vt.copy_(V.mT)

    @torch.no_grad()
    def after_factor_init(self, weight):
        if not self.U.any():  # any init: the outer pair from W0 (init 'nora' sets it itself)
            self.set_outer(weight)

    def projected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B̂, Â) = (U_R S_R B_i, A_i V_Rᵀ): (out, r), (r, in)."""
        return self.U @ self.B_inner, self.A_inner @ self.Vt

    def forward(self, x, y, weight, mask=None):
        B, A = self.projected()
        return y + F.linear(self.rank_masked(F.linear(x, A), mask) * self.scale, B)

    def delta_weight(self, weight):
        B, A = self.projected()
        return self.scale * (B @ A)

    def update_factors(self, weight):
        B, A = self.projected()
        return B * self.scale, A
