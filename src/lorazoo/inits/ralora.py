"""RaLoRA and RaLoRA-Pro: block count from the gradient's effective rank (study Eq. 54, [63]).

"Gradient Intrinsic Dimensionality Alignment: Narrowing the Gap Between Low-Rank Adaptation and
Full Fine-Tuning" (ICLR 2026); official code hhnqqq/MyTransformers, ``common/lora_modules/ralora.py``.
One calibration pass gives G = dL/dW (out, in) per target (calibration.collect). Then:

    erank(G) = exp(-Σ_k p_k log p_k),  p_k = σ_k / Σ_j σ_j          (Eq. 54; σ the singular values)
    n = 2^clip(floor(log2 erank(G) - log2 r), 0, P)                    (the official code)

and the layer gets MeLoRA's block diagonal (Eq. 14-15, form ``ralora``) with n blocks of rank r: an
update of rank up to n·r ≈ erank(G) for LoRA-r's parameter count r·(in + out), which is RaLoRA's
point ("aligns each adapter's effective rank to the GID by increasing the number of diagonal
blocks without increasing the total parameter count").

- RaLoRA (``ralora_pro`` = False): r = spec.rank on every layer; only n adapts.
- RaLoRA-Pro (``ralora_pro`` = True): r_i from GoRA's allocation first (Eq. 51-53, shared code:
  inits/gora.GradientRankInit, with ``ralora_min_rank``/``ralora_max_rank``/``ralora_features``/
  ``ralora_importance``, same defaults and guarantees as GoRA's), then n_i from erank(G_i)/r_i:
  the inter-layer (ranks) and intra-layer (blocks) alignment of the paper.

Choices:
- n is a power of two as in the official code (``2 ** n_splits_power``); P = ``ralora_max_power``
  (the code has no default and requires it; 5 here, so r = 8 reaches the study's largest reported
  gradient dimensionality, about 300, as 8·32 = 256). n is halved further while a block would be
  narrower than its rank (r <= min(in, out) // n); the code instead requires in and out divisible
  by n, here shapes are cut as torch.tensor_split (MeLoRA's rule).
- erank: exact singular values in at least float32, zero singular values contribute 0 (the code adds
  1e-10 inside the log), floored at 1 as in the code. A layer whose gradient is zero gets n = 1.
- Factors: MeLoRA's init per block (A_i Kaiming-uniform with fan-in in_i, B_i = 0), as the code's
  ``init_lora_weights_for``: the model starts as the base model.
- Scale: the spec's s(alpha, r_i) with each layer's own block rank (the code's
  ``ralora_dynamic_scaling``; its default alpha/r_ref); with B = 0 it does not move the start.
"""
from __future__ import annotations

import math

import torch

from ..analysis.spectrum import effective_rank as spectrum_effective_rank
from ..errors import SpecError
from ..parts import check_number
from ..registry import INITS
from .calibration import shape_of
from .gora import GradientRankInit


def effective_rank(G: torch.Tensor) -> float:
    """Eq. 54 (lorazoo.analysis.spectrum.effective_rank), floored at 1 as the official code: a zero
    gradient gives 1 (one block)."""
    return max(1.0, spectrum_effective_rank(G))


def block_count(erank: float, r: int, max_power: int, n_in: int, n_out: int) -> int:
    """2^clip(floor(log2 erank - log2 r), 0, max_power), halved until every block holds rank r."""
    power = min(max_power, max(0, math.floor(math.log2(erank) - math.log2(r))))
    n = 2 ** power
    while n > 1 and r > min(n_in // n, n_out // n):
        n //= 2
    return n


@INITS.register("ralora", paper="RaLoRA / RaLoRA-Pro (Gradient Intrinsic Dimensionality Alignment, ICLR 2026) [63]",
                equations="study Eq. 54: erank(G) = exp(-Σ p log p), p = σ/Σσ; n = 2^floor(log2(erank/r)) blocks of "
                          "Eq. 14 (MeLoRA); Pro: r_i by GoRA's Eq. 51-53 first",
                summary="per-layer block-diagonal count aligned to the calibration gradient's effective rank "
                        "(Pro: ranks allocated by gradient importance too), LoRA-r's parameters per layer")
class RaLoRAInit(GradientRankInit):
    """RaLoRA(-Pro) on the ``ralora`` form. Options: ``ralora_pro`` (False), ``ralora_max_power`` (5),
    and for Pro ``ralora_min_rank``, ``ralora_max_rank``, ``ralora_features``, ``ralora_importance``."""

    needs_factors = False
    prefix = "ralora"
    options = {"ralora_pro": False, "ralora_max_power": 5, "ralora_min_rank": 1, "ralora_max_rank": 0,
               "ralora_features": "linear", "ralora_importance": "mean"}

    @classmethod
    def validate(cls, opts):
        if not isinstance(opts["ralora_pro"], bool):
            raise SpecError(f"ralora_pro must be True or False, got {opts['ralora_pro']!r}")
        check_number("ralora_max_power", opts["ralora_max_power"], integer=True, maximum=16)
        cls.validate_allocation(opts, "ralora")

    @classmethod
    def check_form(cls, form_cls):
        from ..forms.ralora import RaLoRA
        if not issubclass(form_cls, RaLoRA):
            raise SpecError(f"init 'ralora' sets the per-layer block count of form 'ralora'; form "
                            f"'{form_cls.part_name}' has none: use form='ralora'")

    def prepare(self, model, targets, calibration):
        super().prepare(model, targets, calibration)
        o = self.spec.options
        self._ranks = (self.allocate_ranks(targets) if o["ralora_pro"]
                       else dict.fromkeys(targets, self.spec.rank))
        self.eranks, self.blocks = {}, {}
        for path, module in targets.items():
            n_in, n_out = shape_of(module)
            self.eranks[path] = effective_rank(self.stats[path].grad)
            self.stats[path].grad = None
            self.blocks[path] = block_count(self.eranks[path], self._ranks[path], o["ralora_max_power"], n_in, n_out)

    def ranks(self):
        return dict(self._ranks) if self.spec.options["ralora_pro"] else None

    def apply(self, path, adapter, layer, weight):
        form = adapter.form
        form.set_blocks(self.blocks[path])
        form.reset_parameters()  # MeLoRA's per-block init for the new blocks: A_i Kaiming(in_i), B = 0
