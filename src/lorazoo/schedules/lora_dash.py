"""LoRA-Dash's schedule (Si et al., 2024 [83]): the pre-launch phase, then the dash phase.

For the first t = ``lora_dash_warmup`` optimizer steps (100, the authors' ``warmup``) the adapter is
plain LoRA. After step t each layer finds its task-specific directions: with the frozen weight
W0 = U diag(σ) Vᵀ and the LoRA update ΔW = s·B·A learned so far, the change of each singular
direction is δ_i = u_iᵀ ΔW v_i and its change rate |δ_i| / σ_i; the k directions of largest rate
are the TSDs, and (u_i, v_i) of those fill the form's U_k, V_kᵀ (``lora_dash``), whose diagonal d
(zero so far) then trains with LoRA ("dash phase"). This is the authors' code
(``calculate_change_rate``, top-k of ``abs(delta_sigma) / abs(sigma)``), run once per optimizer step
count rather than per forward (their counter counts forward calls, which differ from steps with
gradient accumulation or evaluation). Singular values equal to zero would divide by zero: they are
floored at 1e-12·σ_max (a direction the base does not use then ranks first whenever it changed).
The SVD runs in at least float32 (the authors': float32). The directions are saved with the
adapter (the form's buffers), so a resumed or reloaded run keeps them; the schedule has no other
state.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..forms.lora_dash import LoRADash
from ..inits.calibration import work_dtype
from ..parts import Schedule, check_number
from ..registry import SCHEDULES


def task_specific_directions(weight: torch.Tensor, delta: torch.Tensor, k: int):
    """(U_k, V_kᵀ, rates): W's k singular directions of largest |u_iᵀ Δ v_i| / σ_i."""
    dt = work_dtype(weight.dtype)
    U, S, Vh = torch.linalg.svd(weight.to(dt), full_matrices=False)
    change = ((U.T @ delta.to(dt)) * Vh).sum(1)        # diag(Uᵀ Δ V) without the (n x n) product
    rate = change.abs() / S.clamp_min(1e-12 * S.max().clamp_min(torch.finfo(dt).tiny))
    top = torch.topk(rate, k).indices
    return U[:, top], Vh[top], rate


@SCHEDULES.register("lora_dash", paper="LoRA-Dash (Si et al., 2024) [83]",
                    equations="after t steps: δ_i = u_iᵀ(s·B·A)v_i, TSDs = top-k of |δ_i|/σ_i; then train "
                              "U_k diag(d) V_kᵀ with LoRA",
                    summary="pre-launch LoRA for t steps, then add a trainable diagonal on the k task-specific "
                            "directions")
class LoRADashSchedule(Schedule):
    options = {"lora_dash_warmup": 100}

    @classmethod
    def validate(cls, opts):
        check_number("lora_dash_warmup", opts["lora_dash_warmup"], minimum=1, integer=True)

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, LoRADash):
            raise SpecError(f"schedule 'lora_dash' fills the task-specific directions of form 'lora_dash'; form "
                            f"'{form_cls.part_name}' has none")

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        if step != self.spec.options["lora_dash_warmup"]:
            return
        for layer in handle.layers().values():
            form = layer.adapters[handle.name].form
            weight = layer.linear_weight()
            U, Vh, _ = task_specific_directions(weight, (form.B @ form.A) * form.scale, form.d.numel())
            form.U_top.copy_(U)
            form.V_top.copy_(Vh)
