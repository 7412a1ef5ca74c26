"""LoRA-Dash's form (Si et al., 2024 [83], "Unleashing the power of task-specific directions"; study
Sec. II-D2): LoRA plus a trainable diagonal on k task-specific directions of W0.

    h = W0 x + s·B A x + U_k diag(d) V_kᵀ x

U_k (out, k), V_kᵀ (k, in) are frozen buffers, zero until the ``lora_dash`` schedule fills them with
the task-specific directions (TSDs) at the end of the pre-launch phase; d (k,) is trainable and
starts at zero, so the dash term is zero at that switch and the model's function does not jump.
The dash term is not multiplied by s, as the authors' code (``weight_u_top @ diag(loradash_index)
@ weight_vt_top``). k = ``lora_dash_directions`` (8, the authors' ``index``), capped at
min(out, in) on small layers. Mergeable: ΔW = s·B·A + U_k diag(d) V_kᵀ (rank <= r + k). The forward
runs LoRA and the dash term as one pair of matmuls of width r + k (the factors concatenated), never
an (out, in) tensor: LoRA's cost at rank r + k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from .lora import LoRA


@FORMS.register("lora_dash", paper="LoRA-Dash (Si et al., 2024) [83]",
                equations="ΔW = s·B·A + U_k diag(d) V_kᵀ, (U_k, V_k) the task-specific directions of W0",
                summary="LoRA plus a trainable diagonal on k task-specific singular directions of W0")
class LoRADash(LoRA):
    options = {"lora_dash_directions": 8}
    plain_product = False
    rank_bound = "r + k"

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        k = min(int(opts["lora_dash_directions"]), in_features, out_features)
        self.register_buffer("U_top", torch.zeros(out_features, k))
        self.register_buffer("V_top", torch.zeros(k, in_features))
        self.d = nn.Parameter(torch.zeros(k))

    @classmethod
    def validate(cls, opts):
        check_number("lora_dash_directions", opts["lora_dash_directions"], minimum=1, integer=True)

    @classmethod
    def check_spec(cls, spec):
        if spec.form == cls.part_name and spec.schedule != "lora_dash":
            raise SpecError("form 'lora_dash' needs schedule='lora_dash', which finds its task-specific "
                            "directions after the pre-launch phase; without it the dash term stays zero")

    def forward(self, x, y, weight, mask=None):
        # LoRA and the dash term in one pair of matmuls of width r + k:
        # [B, U_k] · ([s·m ; d] ⊙ [A ; V_kᵀ] x)
        down = torch.cat([self.A, self.V_top.to(self.A)])
        lora = self.A.new_full((self.rank,), self.scale) if mask is None else mask * self.scale
        coef = torch.cat([lora, self.d])
        return y + F.linear(F.linear(x, down) * coef, torch.cat([self.B, self.U_top.to(self.B)], dim=1))

    def delta_weight(self, weight):
        return (self.B @ self.A) * self.scale + (self.U_top * self.d) @ self.V_top
