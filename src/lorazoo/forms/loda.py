"""LoDA and LoDA+ (Liu, Koike-Akino, Wang, Brand, Parsons, Wang, 2023/2025, 'LoDA: Low-Dimensional Adaptation
of Large Language Models') [75]: LoRA with a small nonlinear network in the rank dimension.

Study Eq. 85 (LoDA+) and its text: f1 is "two r x r matrices interleaved with three LeakyReLU
functions", f2 "a single LeakyReLU". The printed Eq. 85 applies f1 to X·A·B, an out-dimensional
vector, which two r x r matrices cannot act on; the study's own code (LoRAFactory
``LinearWithLoDA``, behind the study's numbers) applies f1 to the rank activations A x and f2 after
B, which is the only reading where the shapes agree. With z = A x (r values per token) and
σ = LeakyReLU(slope 0.8, the study's code):

    f1(z) = σ(M2 σ(M1 σ(z))),                       M1, M2 (r, r) trainable,
    LoDA:   h = W0 x + s·B(z + f1(z)),              (a nonlinear map of the r-dim space: "low-dimensional")
    LoDA+:  h = W0 x + s·(B z + σ(B f1(z))),        (study Eq. 85; f2 = σ after B)

``loda_plus`` selects LoDA+ (the preset's choice: the study's Eq. 85 and code are LoDA+); LoDA is the
form's default. Both contain LoRA: with M1 = M2 = 0, f1 = σ(0) = 0 (tested). The authors' package
was not found; the paper's abstract and the study are the sources.

Choices:

- Init: A Kaiming-uniform, B zero (LoRA's), so both updates are zero at init (σ(0) = 0) and the model
  starts as the base; M1, M2 Kaiming-uniform with a = sqrt(5) (``nn.Linear(r, r)``'s init, the study
  code's default mixer init, as MoSLoRA's).
- Scale: Eq. 85 writes α/r on the whole update (the study's text then says the paper has none and its
  code multiplies by 1/sqrt(out)); lorazoo uses the scale part, alpha/r by default, on the whole
  update. σ is positively homogeneous, so s·σ(u) = σ(s·u) and s is applied to the (tokens x r)
  activations, not to the (tokens x out) result.
- The DropLoRA rank mask acts on the r values B reads (z + f1(z) for LoDA; z and f1(z) for LoDA+),
  as for Aurora (forms/nonlinear.py).
- Not mergeable (the update depends on x through σ): merging raises NotMergeableError. No plain
  factors: PiSSA-like inits, LoRA-Pro and ReLoRA are refused; LoRA+ speeds up B.

Cost over LoRA: two (tokens x r x r) matmuls and a few elementwise passes on (tokens x r); LoDA+ also
applies B twice (B z and B f1(z)) and σ on (tokens x out): LoDA+'s extra cost is one more
up-projection, about 1.5x LoRA's adapter FLOPs, small beside the frozen layer; its σ after B keeps
its (tokens x out) input for backward, one activation of the layer's output size per adapted layer
(the method's: f2 acts on the full output width). A custom σ keeping only the sign as a bool was
3x slower on CPU (torch.where), so F.leaky_relu is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from .nonlinear import HiddenNonlinear


@FORMS.register("loda", paper="LoDA (Liu, Koike-Akino, Wang, Brand, Parsons, Wang, 'LoDA: Low-Dimensional "
                "Adaptation of Large Language Models') [75]",
                equations="study Eq. 85 and its code: f1(z) = σ(M2 σ(M1 σ(z))), z = A x, σ = LeakyReLU(0.8); "
                "LoDA s·B(z + f1(z)); LoDA+ s·(B z + σ(B f1(z)))",
                summary="LoRA with a LeakyReLU network of two r x r matrices in the rank space (LoDA+: and a "
                "LeakyReLU after B); not mergeable")
class LoDA(HiddenNonlinear):
    """LoDA: s·B(m ⊙ (z + f1(z))); LoDA+ (``loda_plus``): s·(B(m ⊙ z) + σ(B(m ⊙ f1(z)))), z = A x."""

    options = {"loda_plus": False, "loda_negative_slope": 0.8}

    @classmethod
    def validate(cls, opts):
        if not isinstance(opts["loda_plus"], bool):
            raise SpecError(f"loda_plus must be True or False, got {opts['loda_plus']!r}")
        check_number("loda_negative_slope", opts["loda_negative_slope"], maximum=1.0)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.plus = bool(opts.get("loda_plus", False))
        self.slope = float(opts.get("loda_negative_slope", 0.8))
        self.M1 = nn.Parameter(torch.empty(rank, rank))
        self.M2 = nn.Parameter(torch.empty(rank, rank))
        self.reset_mixers()
        if self.plus:
            self.rank_bound = "min(in, out) (LeakyReLU after B)"

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "M2" in self._parameters:  # LoRA.__init__ calls this before M1, M2 exist
            self.reset_mixers()

    @torch.no_grad()
    def reset_mixers(self) -> None:
        nn.init.kaiming_uniform_(self.M1, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.M2, a=math.sqrt(5))

    def sigma(self, h: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(h, self.slope)

    def f1(self, z: torch.Tensor) -> torch.Tensor:
        """σ(M2 σ(M1 σ(z))) on (..., r)."""
        return self.sigma(F.linear(self.sigma(F.linear(self.sigma(z), self.M1)), self.M2))

    def phi(self, z):
        return z + self.f1(z)

    def delta(self, x, mask):
        if not self.plus:
            return super().delta(x, mask)
        z = F.linear(x, self.A)
        inner = F.linear(self.rank_masked(self.f1(z), mask) * self.scale, self.B)
        linear = F.linear(self.rank_masked(z, mask) * self.scale, self.B)
        return linear + self.sigma(inner)  # s·σ(u) = σ(s·u) for s > 0

