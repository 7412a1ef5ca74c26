"""SaLoRA's budget schedule (Hu et al. 2023 [56]; study Eq. 48-49): an L0 budget by Lagrangian relaxation.

Loss added to the task loss (``aux_loss``):

    salora_orth_reg · Σ_layers R_orth(B, A)  +  λ1·c + λ2·c²,   c = Σ_layers E‖z‖₀ / Σ_layers r − b,

with E‖z‖₀ the expected L0 norm of Eq. 48 (differentiable in every gate's log α) and b the target
fraction of active ranks, ``salora_target_rank / rank`` (default: two thirds of the rank, as
AdaLoRA's default). The multipliers λ1, λ2 start at 0 and are trained by gradient *ascent* on the
same loss (∂/∂λ1 = c, ∂/∂λ2 = c²), at rate ``salora_lambda_lr`` (0.05: neither the study nor the
code the study ran gives one), in ``before_step`` with the c of
the step's forward, so the budget is a constraint the gates must meet rather than a fixed penalty:
the study's Eq. 49 writes the fixed penalty β·(c)² (β a hyperparameter); the Lagrangian form
λ1·c + λ2·c² with ascent is that of the structured-pruning work SaLoRA builds on (Wang et al. 2020)
and what the study's text calls "Lagrangian relaxation". The study divides Σ_k R_L0 by the rank r
of one layer, which makes b a count of layers; we divide by the total rank so b is a fraction.

Exact budget: the relaxation only meets b in expectation, so at step T − t_f (``salora_final_steps``,
default 0.3 of the run, as AdaLoRA's final phase) the schedule keeps exactly b·Σr ranks, those most
likely open (largest P(z > 0), ranked over all layers together), records them in each form's saved
``rank_mask`` and switches the Lagrangian term off; the kept gates keep training. T is
``salora_total_steps`` or the run's own length (``handle.plan``, called by lorazoo's trainer).
The multipliers, the last step and the plan are checkpointed through ``state_dict``.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..forms.salora import SaLoRA
from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from . import rankalloc as ra
from .adalora import default_target_rank


@SCHEDULES.register("salora", paper="SaLoRA (Hu et al., 2023) [56]",
                    equations="study Eq. 48-49: expected L0 of hard-concrete gates, Lagrangian budget, orth. reg.",
                    summary="L0 budget on hard-concrete rank gates by Lagrangian relaxation; exact top-b fix "
                            "at T − t_f")
class SaLoRASchedule(Schedule):
    options = {
        "salora_target_rank": None,
        "salora_total_steps": None,
        "salora_final_steps": 0.3,
        "salora_orth_reg": 0.1,
        "salora_lambda_lr": 0.05,
    }

    @classmethod
    def validate(cls, opts):
        if opts["salora_target_rank"] is not None:
            check_number("salora_target_rank", opts["salora_target_rank"], minimum=1, integer=True)
        ra.check_total_steps("salora_total_steps", opts["salora_total_steps"])
        ra.check_steps_option("salora_final_steps", opts["salora_final_steps"])
        check_number("salora_orth_reg", opts["salora_orth_reg"])
        check_number("salora_lambda_lr", opts["salora_lambda_lr"])
        if opts["salora_total_steps"] is not None:
            cls._resolve(opts, opts["salora_total_steps"])

    @staticmethod
    def _resolve(opts, total: int) -> tuple[int, int]:
        T = opts["salora_total_steps"] or total
        tf = ra.steps_of("salora_final_steps", opts["salora_final_steps"], T)
        if tf >= T:
            raise SpecError(f"salora_final_steps ({tf}) must be below the run's {T} steps, so the budget is "
                            f"fixed during training")
        return T, tf

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, SaLoRA):
            raise SpecError(f"schedule 'salora' gates the ranks of form 'salora', not form "
                            f"'{form_cls.part_name}'; use form='salora' (or the 'salora' preset)")

    @classmethod
    def check_spec(cls, spec):
        target = spec.options["salora_target_rank"]
        if target is not None and target > spec.rank:
            raise SpecError(f"salora_target_rank ({target}) cannot exceed the rank ({spec.rank}): the budget "
                            f"only closes gates; lower salora_target_rank or raise rank")

    def __init__(self, spec):
        super().__init__(spec)
        o = spec.options
        self.total = self.t_final = None
        if o["salora_total_steps"] is not None:
            self.plan(o["salora_total_steps"])
        self.target_rank = o["salora_target_rank"] or default_target_rank(spec.rank)
        self.lambda_lr = float(o["salora_lambda_lr"])
        self.lambdas = [0.0, 0.0]  # λ1, λ2 of the Lagrangian
        self.fixed = False         # the exact budget has been applied
        self.step = 0

    def plan(self, total_steps: int) -> None:
        self.total, self.t_final = self._resolve(self.spec.options, total_steps)

    # --- the budget -----------------------------------------------------------------------------
    @staticmethod
    def _forms(handle) -> list[SaLoRA]:
        return [ad.form for ad in handle.adapters().values()]

    def target_total(self, forms) -> int:
        """b·Σr: the number of ranks kept, target rank × layers (at most every rank)."""
        return min(sum(f.rank for f in forms), self.target_rank * len(forms))

    def constraint(self, forms) -> torch.Tensor:
        """c = Σ E‖z‖₀ / Σ r − b (differentiable)."""
        capacity = sum(f.rank for f in forms)
        return torch.stack([f.expected_l0() for f in forms]).sum() / capacity - self.target_total(forms) / capacity

    def aux_loss(self, handle):
        forms = self._forms(handle)
        terms = []
        reg = self.spec.options["salora_orth_reg"]
        if reg:
            terms.append(reg * torch.stack([f.orthogonality() for f in forms]).sum())
        if not self.fixed:
            c = self.constraint(forms)
            terms.append(self.lambdas[0] * c + self.lambdas[1] * c * c)
        return sum(terms) if terms else None

    @torch.no_grad()
    def before_step(self, handle, optimizer):
        ra.require_plan(self.total, "SaLoRA", "salora_total_steps")
        if self.fixed:
            return
        c = float(self.constraint(self._forms(handle)))
        self.lambdas[0] += self.lambda_lr * c       # gradient ascent: ∂L/∂λ1 = c
        self.lambdas[1] += self.lambda_lr * c * c   # ∂L/∂λ2 = c²

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        ra.require_plan(self.total, "SaLoRA", "salora_total_steps")
        self.step = step
        if self.fixed or step < self.total - self.t_final:
            return
        forms = self._forms(handle)
        keep = ra.topk_mask([f.open_probability() * f.rank_mask for f in forms], self.target_total(forms))
        for f, k in zip(forms, keep):
            f.rank_mask.copy_(k.to(f.rank_mask))
        self.fixed = True

    def summary(self, handle):
        return ra.allocation_summary(handle)

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self):
        return {"step": self.step, "plan": [self.total, self.t_final], "lambdas": list(self.lambdas),
                "fixed": self.fixed}

    def load_state_dict(self, state):
        try:
            self.lambdas = [float(v) for v in state.get("lambdas", [0.0, 0.0])]
            self.fixed = bool(state.get("fixed", False))
            self.step = int(state.get("step", 0))
            total, tf = state.get("plan", [None, None])
        except (TypeError, ValueError) as e:
            raise LorazooError(f"the SaLoRA schedule state in the checkpoint is damaged ({e})") from None
        if total is not None:
            self.total, self.t_final = int(total), int(tf)
