"""LoRA-SB init (Ponkshe et al., 2024 [131], "Initialization using update approximation is a silver
bullet"; study Sec. II-D2): the frozen factors span the best rank-r approximation of full
fine-tuning's first (Adam) update, and the trainable core starts at its singular values.

With G the calibration gradient dL/dW0 (out, in) of each layer (``calibration.collect``, as LoRA-GA),
the authors approximate full fine-tuning's first AdamW step by ΔW = −η·sign(G) (their
``estimate_and_process_grads_torch``: ``-1 * lr * torch.sign(grad)``) and set, with ΔW = U S Vᵀ,

    B = U_r,   A = V_rᵀ,   R = diag(S_r) / s          (form ``lora_sb``: only R trains)

so the adapter starts at s·B·R·A = ΔW_r, the best rank-r approximation of ΔW (the paper's "optimal
low-rank approximation of the initial gradient"); the authors put S_r in R and keep the PEFT scale
outside, which is the same start at s = 1; dividing by s gives that start whatever alpha and r.
The base is not shifted (their code does not), so the model starts one approximated step away
from the base (``starts_as_base = False``, as LoRA-One). η = ``lora_sb_eta``: the authors use the
first step's learning rate of their linear warm-up, lr / (warmup_ratio·total_steps); our default
1e-4 is a plain choice, to be set to that value. Exact SVD by default; ``lora_sb_niter`` = n > 0
uses a randomized SVD (the authors': ``svd_lowrank``). sign(G) does not depend on whether the
gradient is summed or averaged over the batches.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..forms.lora_sb import LoRASB
from ..parts import check_number
from ..registry import INITS
from .calibration import CalibratedInit
from .svd import top_svd


@INITS.register("lora_sb", paper="LoRA-SB (Ponkshe et al., 2024) [131]",
                equations="ΔW = −η·sign(G) = U S Vᵀ; B = U_r, A = V_rᵀ, R = S_r / s (B, A frozen); no base shift",
                summary="frozen factors from the SVD of the approximated first Adam update, core at its "
                        "singular values")
class LoRASBInit(CalibratedInit):
    collects = ("grad",)
    needs_factors = False
    starts_as_base = False
    options = {"lora_sb_eta": 1e-4, "lora_sb_niter": 0}

    @classmethod
    def validate(cls, opts):
        check_number("lora_sb_eta", opts["lora_sb_eta"], strict=True)
        check_number("lora_sb_niter", opts["lora_sb_niter"], integer=True)

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, LoRASB):
            raise SpecError(f"init 'lora_sb' sets the frozen factors and the r x r core of form 'lora_sb'; form "
                            f"'{form_cls.part_name}' is not it")

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        form = adapter.form
        G = self.stats[path].grad
        self.stats[path].grad = None
        U, S, V = top_svd(-self.spec.options["lora_sb_eta"] * torch.sign(G), form.rank,
                          self.spec.options["lora_sb_niter"])
        form.B.copy_(U)
        form.A.copy_(V.T)
        form.M.copy_(torch.diag(S) / form.scale)
        form.mixer_from_init = True
