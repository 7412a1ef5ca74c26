"""LoRAN (Li, Song, Hou, Findings of EMNLP 2024 [74]): LoRA's product B·A passed entrywise through Sinter.

The study only names LoRAN; the specification is the paper and the authors' code
(github.com/liyinqiao2012/PEFT-LoRAN, ``src/peft/tuners/mlora.py`` and ``utils/other.py``). There the
update is a fixed weight, the nonlinearity acting on the entries of the accumulated low-rank update
("a new non-linear function to appropriately fit the accumulated weight updates", paper abstract):

    ΔW = s·f(B A),   f(z) = z + a·z·sin(ω z)  entrywise (Sinter),   h = W0 x + ΔW x,

with the released configurations (both experiments' ``adapter_config.json`` and the README):
``mlora_af="Sin"``, a = 5e-5, ω = 1e4, one transformation (``r=[r, in]``), no extra P or b layers;
those are the defaults here (``loran_amplitude``, ``loran_frequency``; the code's config class has
a = 5e-4, ω = 1e3 as field defaults, which its experiments do not use). Init as the code: A
Kaiming-uniform, B zero, s = alpha/r, so ΔW = s·f(0) = 0 at init.

Consequences, which differ from Aurora's between-the-factors nonlinearity:

- ΔW is a matrix that does not depend on x, so LoRAN merges exactly (the authors' ``merge`` adds it
  to W) and inference after merging costs nothing.
- f(BA) is generally full rank (the paper's point), and has no factored form: the forward forms the
  dense (out, in) update, as the authors' forward does (``x @ af(B @ A)``). A training step then
  costs, per adapted layer, 3·out·in·r for B·A (twice: it is recomputed in backward) and the gradients
  of B and A, a few elementwise passes over out·in, and 3·tokens·in·out to apply ΔW and get the
  gradients of x and ΔW, against LoRA's 6·tokens·r·(in + out). This is the method, not this
  implementation. When LoRAN is the layer's only running adapter, the base matmul is folded in,
  x (W0 + ΔW)ᵀ (forms/dense.py), so the layer's step costs 3·tokens·in·out in all, against the frozen
  layer's own 2; merged, inference costs nothing extra. Memory: the shared dense autograd function
  keeps only x, B and A for backward and recomputes ΔW and f'(BA) there, so autograd holds no
  (out, in) tensor per layer between forward and backward.
- At the default a = 5e-5 the Sinter term is below the resolution of bf16/fp16 entries of B·A (about
  4e-3 and 5e-4 relative), so in half precision the update rounds to s·B·A (the authors' adapters are
  float32).

The DropLoRA rank mask acts inside the product: ΔW = s·f(B diag(m) A), DropLoRA's (B ⊙ M)(M ⊙ A).

Note: the study's own LoRAFactory code (``LinearWithLoRAN``, behind the study's LoRAN numbers) applies
Sinter to the low-rank output instead, s·f(B A x), which depends on x and cannot be merged; lorazoo
follows the authors' code.
"""
from __future__ import annotations

import torch

from ..parts import check_number
from ..registry import FORMS
from .nonlinear import EntrywiseNonlinear


def sinter(P: torch.Tensor, amplitude: float, frequency: float) -> torch.Tensor:
    """f(P) = P + a·P·sin(ωP), entrywise."""
    return torch.addcmul(P, P, torch.sin(P * frequency), value=amplitude)


@FORMS.register("loran", paper="LoRAN (Li, Song, Hou, 2024, 'Improved Low-Rank Adaptation by a Non-Linear "
                "Transformation') [74]",
                equations="authors' code (mlora.py get_delta_weight, Sin): ΔW = s·f(B A), f(z) = z + a·z·sin(ω z) "
                "entrywise, a = 5e-5, ω = 1e4",
                summary="LoRA whose product B·A passes entrywise through Sinter; full-rank ΔW, mergeable, dense")
class LoRAN(EntrywiseNonlinear):
    """ΔW = s·f(B diag(m) A), f(z) = z + a·z·sin(ωz) (Sinter), a = ``loran_amplitude``, ω = ``loran_frequency``."""

    options = {"loran_amplitude": 5e-5, "loran_frequency": 1e4}
    rank_bound = "min(in, out) (Sinter acts on the entries of B·A)"

    @classmethod
    def validate(cls, opts):
        check_number("loran_amplitude", opts["loran_amplitude"])
        check_number("loran_frequency", opts["loran_frequency"])

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.amplitude = float(opts.get("loran_amplitude", 5e-5))
        self.frequency = float(opts.get("loran_frequency", 1e4))

    def entrywise(self, P: torch.Tensor) -> torch.Tensor:
        return sinter(P, self.amplitude, self.frequency)

    def entrywise_slope(self, P: torch.Tensor) -> torch.Tensor:
        """f'(P) = 1 + a·sin(ωP) + a·ω·P·cos(ωP)."""
        wP = P * self.frequency
        return torch.addcmul(torch.sin(wP).mul_(self.amplitude).add_(1.0), wP, torch.cos(wP), value=self.amplitude)
