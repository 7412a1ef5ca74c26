"""SoRA's sparsifying schedule (Ding et al. 2023 [57]): proximal gradient on the gate, with its ξ schedule.

After every optimizer step the gate of each layer takes the proximal step of the L1 norm
(soft-thresholding, SoRA Eq. 4-5):

    g ← sign(g) ⊙ max(|g| − ξ_t, 0),

and every rank whose gate is then zero is pruned: its ``rank_mask`` entry (saved with the adapter)
becomes 0, its gate is held at zero from then on and it no longer enters the forward.

Choices, each where the paper and the authors' code (TsinghuaC3I/SoRA, ``src/sparse_optimizer.py``)
differ or the paper is silent:

- Threshold: the paper writes T_{η_t·ξ} (learning rate times ξ); the authors' optimizer subtracts
  ξ itself after the Adam step (its comment: "still hard to decide: which quantity stands for η").
  We follow the code: ξ_t is an absolute threshold per step, ``sora_xi`` (3e-4, the authors'
  ``sparse_lambda_2`` in run_glue_sora_no_schedule.sh).
- Pruned ranks stay pruned: the code applies the threshold to a gate Adam may move away from zero
  again; the paper prunes the zero ranks at the end. Here a rank is pruned the step its gate reaches
  zero, so the active ranks only decrease and a saved adapter's ranks are exactly the nonzero gates.
- Sparsifying scheduler (paper Algorithm 1): with ``sora_max_xi`` set, ξ grows linearly from
  ``sora_xi`` to ``sora_max_xi`` in ``sora_stages`` equal stages of the run (the code's
  ``lambda_schedule="linear"``, np.linspace over ``lambda_num`` values, one per training stage);
  the authors retrain for a few epochs per stage, we spread the stages over one run.
- ``sora_l1`` adds sora_l1 · mean|g| to the loss, the authors' extra ``sparse_lambda`` term (10 in
  the fixed-ξ script); it is 0 by default, the paper's objective being the proximal step alone.
- The gate shares the parameter groups and learning rate of A and B (the code's ``sparse_lr``
  defaults to the learning rate too) and weight decay is the trainer's (0 by default).

The last step and the plan are checkpointed through ``state_dict``; ξ_t is a function of the step.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..forms.sora import SoRA
from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from . import rankalloc as ra


def soft_threshold(g: torch.Tensor, xi: float) -> torch.Tensor:
    """The proximal operator of xi·‖g‖₁: sign(g)·max(|g| − xi, 0)."""
    return torch.sign(g) * (g.abs() - xi).clamp_min(0.0)


@SCHEDULES.register("sora", paper="SoRA (Ding et al., 2023) [57]",
                    equations="SoRA Eq. 4-5: g ← sign(g)·max(|g| − ξ_t, 0); Algorithm 1: ξ_t in linear stages",
                    summary="proximal (soft-threshold) step on the rank gate after each step; zero gates pruned")
class SoRASchedule(Schedule):
    options = {
        "sora_xi": 3e-4,
        "sora_max_xi": None,
        "sora_stages": 7,
        "sora_l1": 0.0,
        "sora_total_steps": None,
    }

    @classmethod
    def validate(cls, opts):
        check_number("sora_xi", opts["sora_xi"])
        if opts["sora_max_xi"] is not None:
            check_number("sora_max_xi", opts["sora_max_xi"])
            if opts["sora_max_xi"] < opts["sora_xi"]:
                raise SpecError(f"sora_max_xi ({opts['sora_max_xi']}) must be >= sora_xi ({opts['sora_xi']}): the "
                                f"sparsifying schedule only raises the threshold")
        check_number("sora_stages", opts["sora_stages"], minimum=1, integer=True)
        check_number("sora_l1", opts["sora_l1"])
        ra.check_total_steps("sora_total_steps", opts["sora_total_steps"])

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, SoRA):
            raise SpecError(f"schedule 'sora' thresholds the gate of form 'sora', not form "
                            f"'{form_cls.part_name}'; use form='sora' (or the 'sora' preset)")

    def __init__(self, spec):
        super().__init__(spec)
        o = spec.options
        self.xi, self.max_xi, self.stages = float(o["sora_xi"]), o["sora_max_xi"], int(o["sora_stages"])
        self.total = o["sora_total_steps"]
        self.step = 0

    def plan(self, total_steps: int) -> None:
        if self.spec.options["sora_total_steps"] is None:
            self.total = int(total_steps)

    def xi_at(self, step: int) -> float:
        """ξ_t at (1-based) ``step``: constant, or stage k = floor((t − 1)·n / T) of n linear values."""
        if self.max_xi is None or self.stages == 1:
            return self.xi
        ra.require_plan(self.total, "SoRA's sparsifying", "sora_total_steps")
        stage = min(self.stages - 1, (step - 1) * self.stages // self.total)
        return self.xi + (float(self.max_xi) - self.xi) * stage / (self.stages - 1)

    def aux_loss(self, handle):
        weight = self.spec.options["sora_l1"]
        if not weight:
            return None
        gates = torch.cat([ad.form.gates() for ad in handle.adapters().values()])
        return weight * gates.abs().mean()

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        self.step = step
        xi = self.xi_at(step)
        for ad in handle.adapters().values():
            form = ad.form
            g = soft_threshold(form.gate, xi) * form.rank_mask
            form.gate.copy_(g)
            form.rank_mask.mul_((g != 0).to(form.rank_mask))

    def summary(self, handle):
        return ra.allocation_summary(handle)

    def state_dict(self):
        return {"step": self.step, "total": self.total}

    def load_state_dict(self, state):
        try:
            self.step = int(state.get("step", 0))
            total = state.get("total")
        except (TypeError, ValueError) as e:
            raise LorazooError(f"the SoRA schedule state in the checkpoint is damaged ({e})") from None
        if total is not None:
            self.total = int(total)
