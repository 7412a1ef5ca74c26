"""Sine-LoRA (Ji, Saratchandran, Gordon, Zhang, Lucey, ICLR 2025, 'Efficient Learning with Sine-Activated
Low-Rank Matrices', arXiv 2403.19243) [73]: LoRA's product passed entrywise through a sine.

The study only names the method; the specification is the paper (φ = sin(ω·U Vᵀ)/g raises the rank
of a low-rank product; ω the frequency, g a gain that keeps the update small) and the authors' code,
github.com/samy-ji/Sine-Low-Rank (read at commit 6dd03a0), ``llm/peft/src/peft/tuners/sinlora.py``:

    ΔW = s·sin(ω·B A)/g,   g = sqrt(in),   s = alpha/r,   h = W0 x + ΔW x,

A Kaiming-uniform, B zero (LoRA's init, the code's ``reset_parameters``), so ΔW = sin(0) = 0 at init
and the model starts as the base.

Verified in the authors' code: the form (forward ``x @ sin(freq·Aᵀ Bᵀ)/self.s * scaling``, merge
``sin(freq·B A)/self.s * scaling``), the gain (``Linear.__init__`` ends with ``self.s =
math.sqrt(in_features)``, overwriting the ``s`` argument; sindora.py the same, its optional
``learnable`` mode starts the trainable gain at sqrt(in)), the init, and s = lora_alpha/r.
``sinelora_gain`` overrides g (0: sqrt(in)).

NOT verified: ω. The released LLM scripts take it as a required argument (``finetune.py``: ``freq:
int = 0``, which would give ΔW = 0; ``commonsense_evaluate_sindora.py``: ``--freq``, required) and no
value is recorded in the repository, its README or the project page (github.com/samy-ji/
sine_activated_PEL, which only shows ω = 100 and ω = 2000 in its rank illustration). The paper's
experimental appendix could not be read here (only its abstract and introduction were reachable).
The study's LoRAFactory code defaults to ``--sinelora-freq 600``, but for a different placement
(sin(ω·B A x)/sqrt(out) on the activations), so its value does not transfer. The default 200
(``sinelora_frequency``) is kept as an unchecked order of magnitude: set ω from the paper's LLM setup
before reproducing a table.

Choices:

- The sine acts on the entries of the weight update, as the authors' code and the paper's title.
  The study's own LoRAFactory code (``LinearWithSineLoRA``) applies it to the low-rank output
  instead, sin(ω·B A x)/sqrt(out), which depends on x and cannot be merged; lorazoo follows the
  authors.
- ΔW is a fixed matrix: mergeable exactly. It is dense (sin(BA) has no factored form), so the
  forward forms the (out, in) product as the authors' forward does; the shared
  :class:`~lorazoo.forms.nonlinear.EntrywiseNonlinear` keeps only x, B and A for backward. Cost per
  training step: the LoRAN argument (forms/loran.py); merged inference costs nothing.
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
                equations="authors' code (sinlora.py): ΔW = s·sin(ω·B A)/g, g = sqrt(in) (verified); ω = 200 (not in the "
                "code; unverified)",
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
