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
  dense (out, in) update, as the authors' forward does (``x @ af(B @ A)``). Per step this costs
  out·in·r for B·A, a few elementwise passes over out·in, and tokens·in·out to apply it, against
  LoRA's tokens·r·(in + out); it is a property of the method, not of this implementation. Memory:
  one autograd function (:class:`_Sinter`) keeps only B·A for backward and recomputes sin/cos there.

The DropLoRA rank mask acts inside the product: ΔW = s·f(B diag(m) A), DropLoRA's (B ⊙ M)(M ⊙ A).

Departure noted: the study's LoRAFactory code applies Sinter to the low-rank output instead,
s·f(B A x), which is not mergeable; lorazoo follows the authors' code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..parts import check_number
from ..registry import FORMS
from .nonlinear import NonlinearLoRA


class _Sinter(torch.autograd.Function):
    """s·(P + a·P·sin(ωP)) entrywise; saves P only (f'(P) = 1 + a·sin(ωP) + a·ω·P·cos(ωP))."""

    @staticmethod
    def forward(ctx, P, amplitude, frequency, scale):
        ctx.save_for_backward(P)
        ctx.consts = amplitude, frequency, scale
        return torch.addcmul(P, P, torch.sin(P * frequency), value=amplitude) * scale

    @staticmethod
    def backward(ctx, grad):
        (P,) = ctx.saved_tensors
        a, w, s = ctx.consts
        wP = P * w
        slope = torch.addcmul(torch.sin(wP).mul_(a).add_(1.0), wP, torch.cos(wP), value=a)
        return grad * slope * s, None, None, None


@FORMS.register("loran", paper="LoRAN (Li, Song, Hou, 2024, 'Improved Low-Rank Adaptation by a Non-Linear "
                "Transformation') [74]",
                equations="authors' code (mlora.py get_delta_weight, Sin): ΔW = s·f(B A), f(z) = z + a·z·sin(ω z) "
                "entrywise, a = 5e-5, ω = 1e4",
                summary="LoRA whose product B·A passes entrywise through Sinter; full-rank ΔW, mergeable, dense")
class LoRAN(NonlinearLoRA):
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

    def update(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """s·f(B diag(m) A), the dense (out, in) update."""
        B = self.B if mask is None else self.B * mask
        return _Sinter.apply(B @ self.A, self.amplitude, self.frequency, self.scale)

    def delta(self, x, mask):
        return F.linear(x, self.update(mask))

    def delta_weight(self, weight):
        return self.update()
