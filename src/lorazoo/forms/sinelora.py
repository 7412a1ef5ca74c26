"""Sine-LoRA (Ji, Saratchandran, Gordon, Zhang, Lucey, ICLR 2025, 'Efficient Learning with Sine-Activated
Low-Rank Matrices') [73]: LoRA's product passed entrywise through a sine.

The study only names the method; the specification is the paper (Sec. 3: φ(x) = sin(ω·U Vᵀ)/g raises
the rank of a low-rank product, ω the frequency, g a gain that keeps the update small) and the
authors' code (github.com/samy-ji/Sine-Low-Rank, ``llm/peft/src/peft/tuners/sinlora.py``):

    ΔW = s·sin(ω·B A)/g,   g = sqrt(in),   s = alpha/r,   h = W0 x + ΔW x,

A Kaiming-uniform, B zero (LoRA's init, the code's ``reset_parameters``), so ΔW = sin(0) = 0 at init
and the model starts as the base. g = sqrt(in_features) as the code (``self.s =
math.sqrt(in_features)``); ``sinelora_gain`` overrides it. ω (``sinelora_frequency``) is a required
command-line argument of the released scripts with no value anywhere in the repository, and the
paper's experimental section could not be read here: the default 200 is UNVERIFIED (an order of
magnitude in the paper's range, not a checked value); check it against the paper's LLM setup
before reproducing a table.

Choices:

- The sine acts on the entries of the weight update, as the authors' code (``x @ sin(ω Aᵀ Bᵀ)/g``)
  and the paper's title ("sine-activated low-rank matrices"). The study's own LoRAFactory code
  (``LinearWithSineLoRA``) applies it to the low-rank output instead, sin(ω·B A x)/sqrt(out), which
  depends on x and cannot be merged; lorazoo follows the authors.
- ΔW is a fixed matrix: mergeable exactly. It is dense (sin(BA) has no factored form), so the
  forward forms the (out, in) product as the authors' forward does; the shared
  :class:`~lorazoo.forms.nonlinear.EntrywiseNonlinear` keeps only x and B·A for backward. Cost per
  training step: about 1.5 x the frozen layer's own matmul work on top of it (the LoRAN argument,
  forms/loran.py); merged inference costs nothing.
- The DropLoRA rank mask acts inside the product, sin(ω·B diag(m) A).
- No plain factors offered (the update is not s·B·A): PiSSA-like inits, LoRA-Pro and ReLoRA are
  refused; LoRA+ speeds up B.
"""
from __future__ import annotations

import math

import torch

from ..parts import check_number
from ..registry import FORMS
from .nonlinear import EntrywiseNonlinear


@FORMS.register("sinelora", paper="Sine-LoRA (Ji et al., ICLR 2025, 'Efficient Learning with Sine-Activated "
                "Low-Rank Matrices') [73]",
                equations="paper Sec. 3 and authors' code (sinlora.py): ΔW = s·sin(ω·B A)/g, g = sqrt(in), ω = 200 (unverified)",
                summary="LoRA whose product B·A passes entrywise through sin(ω·)/g; full-rank ΔW, mergeable, dense")
class SineLoRA(EntrywiseNonlinear):
    """ΔW = s·sin(ω·B diag(m) A)/g; ω = ``sinelora_frequency``, g = ``sinelora_gain`` (0: sqrt(in))."""

    options = {"sinelora_frequency": 200.0, "sinelora_gain": 0.0}

    @classmethod
    def validate(cls, opts):
        check_number("sinelora_frequency", opts["sinelora_frequency"], strict=True)
        check_number("sinelora_gain", opts["sinelora_gain"])

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.frequency = float(opts.get("sinelora_frequency", 200.0))
        self.gain = float(opts.get("sinelora_gain", 0.0)) or math.sqrt(in_features)

    def entrywise(self, P: torch.Tensor) -> torch.Tensor:
        return torch.sin(P * self.frequency) / self.gain

    def entrywise_slope(self, P: torch.Tensor) -> torch.Tensor:
        return torch.cos(P * self.frequency) * (self.frequency / self.gain)
