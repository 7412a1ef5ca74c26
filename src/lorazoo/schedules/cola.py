"""CoLA, Chain of LoRA (Xia, Qin & Hazan, 2024 [40]; study Sec. II-B1): tune, tie a knot, extend the chain.

The run of T optimizer steps is cut into M = ``cola_chains`` links (default 3) at the knots
τ_j = round(j·T/M), j = 1..M−1. At each knot every layer

1. ties the knot: W0 <- W0 + s·B·A (the link's update goes into the frozen base, through the
   adapter's base shift, so a saved adapter reproduces it and ``delete`` undoes it);
2. extends the chain: the factors are re-initialized by the form (A random, B = 0, so the model's
   function is unchanged) and their optimizer state is dropped ("re-initialize optimization for
   new-born LoRA modules"), so the next link learns the residual from a fresh start.

The final link stays in the adapter. The Frank-Wolfe reading (the paper's motivation): each link
approximately solves a rank-r linear sub-problem around the current weight and the knot takes
the full step along it; the sum of the links has rank up to M·r (tested).

Choices: the knots are spread evenly over the planned run (``handle.plan``, which lorazoo's
trainer calls; the run's length and the resolved knots go through ``TrainingState``); the paper's
chain-length study goes up to 3 links, our default. Not implemented: the paper's rank step-down
variant (smaller ranks for later links), which would need a per-link rank. Differs from ReLoRA
(``relora``) by resetting the optimizer fully, with no magnitude pruning and no jagged learning rate.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError
from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from .merging import check_plain_product, drop_state, fold, refuse_merged


@SCHEDULES.register("cola", paper="Chain of LoRA (Xia, Qin & Hazan, 2024) [40]",
                    equations="study Sec. II-B1; at knots τ_j = round(j·T/M): W0 += s·B·A, re-init, optimizer reset",
                    summary="cut the run into M links; at each knot merge s·B·A into the base and restart a fresh LoRA")
class CoLA(Schedule):
    options = {"cola_chains": 3}

    @classmethod
    def validate(cls, opts):
        check_number("cola_chains", opts["cola_chains"], minimum=1, integer=True)

    @classmethod
    def check_form(cls, form_cls):
        check_plain_product(form_cls, "cola", "merges s·B·A into the base and restarts from a zero update")

    def __init__(self, spec):
        super().__init__(spec)
        self.knots: list[int] | None = None

    def plan(self, total_steps):
        M = int(self.spec.options["cola_chains"])
        if M > total_steps:
            raise LorazooError(f"cola_chains={M} links need at least {M} steps; the run has {total_steps}")
        self.knots = sorted({round(j * total_steps / M) for j in range(1, M)})

    def state_dict(self):
        return {"knots": self.knots}

    def load_state_dict(self, state):
        if state.get("knots") is not None:
            self.knots = [int(k) for k in state["knots"]]

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        if self.knots is None:
            raise LorazooError("schedule 'cola' spreads its knots over the run: call handle.plan(total_steps) "
                               "before training (lorazoo's trainer does)")
        if step not in self.knots:
            return
        refuse_merged(handle, "CoLA")
        for layer in handle.layers().values():
            ad = layer.adapters[handle.name]
            fold(layer, ad)
            ad.form.reset_parameters()
            drop_state(optimizer, ad.form.parameters())
