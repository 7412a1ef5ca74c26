"""FLoRA (Si, Wang, Yang, Xu, Li, Dai, Qiao, Yang, Shen, 2024, 'FLoRA: Low-Rank Core Space for N-dimension') [71].

FLoRA writes the change of an N-dimensional weight as a Tucker decomposition, a low-rank core G
multiplied along every mode by a factor matrix. For a linear layer (N = 2) that is

    ΔW = s · G ×1 A^(1) ×2 A^(2) = s · B G A,     B = A^(2) (out, r), G (r, r), A = A^(1)ᵀ (r, in),

with all three trainable: exactly MoSLoRA's s·B·M·A (forms/moslora.py), whose code this form reuses
(forward, merge, rank mask before the core, ``factors``). The two methods differ only in where the
zero that makes ΔW = 0 at init sits, which is what this class changes:

- MoSLoRA: B = 0, A and the mixer Kaiming-uniform.
- FLoRA (authors' code, github.com/SJTU-DeepVisionLab/FLoRA, ``flora/layers.py`` ``FLoRALayer``):
  G = 0 (``nn.init.zeros_(self.param_G)``) and both factors random,
  ``kaiming_normal_(param, a=sqrt(3))`` on the (dim, r) factors: fan-in r, gain sqrt(2/(1+3)), so
  every entry of A and B is N(0, 1/(2r)). ΔW = B·0·A = 0 at init, and the first step moves G alone
  (B and A get zero gradients while G = 0), as in the authors' code.

Scale: the code's ``scale`` is a constant independent of r (its example uses 4.0); the preset
uses ``scale="constant", alpha=4``, and any scale part composes. The authors' forward forms the
dense ΔW; lorazoo applies B, G, A to x in turn (same function, no (out, in) tensor while training).
Only square cores (one r for both modes) are offered; the code allows r_in != r_out.

Factor inits (PiSSA, LoRA-GA, ...): ``factors()`` gives (B, A) as for MoSLoRA. When an init replaced
B (detected against this form's own draw of B), G is set to I so the update is exactly the s·B·A
the init chose (PiSSA's moved out of the base; EVA's B = 0 gives a zero update with A from the
data); when B is still FLoRA's draw (the default init), G keeps its zero. The
update is s·B·G·A, not s·B·A: LoRA-Pro and ReLoRA refuse it (``plain_product`` False, MoSLoRA's).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import FORMS
from .moslora import MoSLoRA


@FORMS.register("flora_si", paper="FLoRA (Si et al., 2024, 'FLoRA: Low-Rank Core Space for N-dimension') [71]",
                equations="Tucker form, N = 2: ΔW = s·G ×1 A1 ×2 A2 = s·B G A, G (r, r); G zero, B, A ~ N(0, 1/(2r))",
                summary="low-rank core space: trainable r x r core G between random B and A; G zero at init")
class FLoRASi(MoSLoRA):
    """ΔW = s·B G (m ⊙ A x): MoSLoRA's structure (``self.M`` is the core G) with FLoRA's init."""

    options = {}  # FLoRA's init is fixed; MoSLoRA's mixer option does not apply
    up_params = ("B",)

    @classmethod
    def validate(cls, opts):
        pass

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)  # draws A, B; M (G) zero
        self._drawn = self.B.detach().clone()  # to tell, after the init part ran, whether it chose B

    @property
    def G(self) -> nn.Parameter:
        """The Tucker core (MoSLoRA's mixer M)."""
        return self.M

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(2 * self.rank)  # kaiming_normal_(a=sqrt(3)) on a (dim, r) factor
        nn.init.normal_(self.A, std=std)
        nn.init.normal_(self.B, std=std)
        if "M" in self._parameters:  # LoRA.__init__ calls this before M exists
            self.reset_mixer()

    @torch.no_grad()
    def reset_mixer(self) -> None:
        nn.init.zeros_(self.M)

    @torch.no_grad()
    def after_factor_init(self, weight):
        """G = I when the init part replaced B (PiSSA & co. chose s·B·A); else G stays zero."""
        drawn, self._drawn = self._drawn, None
        if drawn is not None and not torch.equal(drawn.to(self.B), self.B):
            self.M.copy_(torch.eye(self.rank, dtype=self.M.dtype, device=self.M.device))
