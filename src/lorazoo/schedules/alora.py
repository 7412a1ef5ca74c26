"""ALoRA's ablation-based rank reallocation (Liu et al. 2024 [60]; study Eq. 50).

Train - evaluate - reallocate - retrain: after ``alora_warmup_steps`` and then every
``alora_interval`` steps, ``alora_rounds`` times, the schedule

1. scores every active rank r by ablation (AB-LoRA, study Eq. 50):
   IS(r) = S(M) − S(M∖r) + S(M_r), with S the performance (minus the loss) of the model on the
   validation batches, M∖r the adapter with rank r's gate set to 0, M_r the adapter with only rank r
   kept (every other gate of every layer at 0);
2. prunes the ``alora_prune`` ranks of lowest IS, over all layers together (gate α = 0);
3. gives the same number of ranks to the layers none of whose ranks was pruned in this round, one
   at a time in order of the layer's total IS (highest first), round-robin, skipping full layers
   (falling back to any layer with a free slot when none is left), so the number of active ranks is
   the same after every round: the budget is met exactly.

A new rank starts as LoRA's (A row Kaiming-uniform, B column zero: the function does not jump) and
its rows of every optimizer state tensor shaped like the parameter are zeroed (Adam's moments), the
state a new parameter starts with; the form is pre-allocated (see forms/alora.py) so no shape
changes. The gates are the saved ``rank_mask``, so a saved adapter keeps the reallocated ranks.

Choices where the study (which gives only Eq. 50) and the paper leave room:
- S is −loss (the model's own ``.loss``) averaged over the validation batches, in eval mode without
  gradients; the paper uses a validation metric. Validation batches are set with
  ``handle.schedule.set_validation(batches)``; by default the schedule uses the last training batch
  the model saw (recorded by a forward pre-hook it registers on the model when the adapter is
  built, ``Schedule.attach``, or at the latest at the first ``before_step``).
- "only rank r retained" is read as every other gate of the adapter at 0.
- The paper retrains for a number of epochs between rounds; the rounds here are spread over one run.
- Defaults: pruning one rank per layer per round (``alora_prune`` = number of layers), 3 rounds,
  the first after 25 % of the run and the next every 15 %; a run planned too short for every round
  (``handle.plan``) does the rounds that fit; an explicit ``alora_total_steps`` must fit them all.

Cost: 2·R + 1 evaluation forwards per round (R the active ranks), a handful of times per run; a
training step costs LoRA's at the pre-allocated rank.
"""
from __future__ import annotations

import math

import torch

from ..errors import LorazooError, SpecError
from ..forms.alora import ALoRA
from ..parts import Schedule, ValidationBatches, check_number
from ..registry import SCHEDULES
from . import rankalloc as ra
from .increlora import reset_optimizer_rows


@SCHEDULES.register("alora", paper="ALoRA (Liu et al., 2024) [60]",
                    equations="study Eq. 50: IS(r) = S(M) − S(M∖r) + S(M_r); prune the lowest, reallocate",
                    summary="ablation-scored ranks; prune the least important, give the budget to unpruned layers")
class ALoRASchedule(ValidationBatches, Schedule):
    options = {
        "alora_warmup_steps": 0.25,
        "alora_interval": 0.15,
        "alora_rounds": 3,
        "alora_prune": None,
        "alora_total_steps": None,
    }

    @classmethod
    def validate(cls, opts):
        ra.check_steps_option("alora_warmup_steps", opts["alora_warmup_steps"])
        ra.check_steps_option("alora_interval", opts["alora_interval"])
        if opts["alora_interval"] == 0:
            raise SpecError("alora_interval must be > 0")
        check_number("alora_rounds", opts["alora_rounds"], minimum=1, integer=True)
        if opts["alora_prune"] is not None:
            check_number("alora_prune", opts["alora_prune"], minimum=1, integer=True)
        ra.check_total_steps("alora_total_steps", opts["alora_total_steps"])
        if opts["alora_total_steps"] is not None:
            cls._resolve(opts, opts["alora_total_steps"])

    @staticmethod
    def _resolve(opts, total: int, strict: bool = True) -> list[int]:
        """The steps after which a round runs. ``strict``: every round must fit before the last step
        (the spec's own alora_total_steps); otherwise (a run planned shorter) the rounds that do not
        fit are left out."""
        T = opts["alora_total_steps"] or total
        warm = ra.steps_of("alora_warmup_steps", opts["alora_warmup_steps"], T)
        every = max(1, ra.steps_of("alora_interval", opts["alora_interval"], T))
        steps = [max(1, warm) + k * every for k in range(opts["alora_rounds"])]
        if not strict:
            return [s for s in steps if s < T]
        if steps[-1] >= T:
            raise SpecError(f"ALoRA's {opts['alora_rounds']} rounds (at steps {steps}) do not fit in the run's {T} "
                            f"steps; lower alora_rounds, alora_warmup_steps or alora_interval")
        return steps

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, ALoRA):
            raise SpecError(f"schedule 'alora' moves the ranks of form 'alora', not form '{form_cls.part_name}'; "
                            f"use form='alora' (or the 'alora' preset)")

    @classmethod
    def check_spec(cls, spec):
        init = spec.options["alora_init_rank"]
        if init is not None and init > spec.rank:
            raise SpecError(f"alora_init_rank ({init}) cannot exceed the rank ({spec.rank}, the slots a layer has)")

    def __init__(self, spec):
        super().__init__(spec)
        self.rounds_at: list[int] | None = None
        if spec.options["alora_total_steps"] is not None:
            self.plan(spec.options["alora_total_steps"])
        self.step = 0
        self.history: list[dict] = []  # per round: pruned and added ranks per layer

    def plan(self, total_steps: int) -> None:
        self.rounds_at = self._resolve(self.spec.options, total_steps,
                                       strict=self.spec.options["alora_total_steps"] is not None)

    # --- recording the training batch (ValidationBatches) -------------------------------------
    def attach(self, handle):
        self.watch(handle)

    def before_step(self, handle, optimizer):
        self.watch(handle)  # in case the handle was built without attach()

    # --- scores -------------------------------------------------------------------------------
    @torch.no_grad()
    def performance(self, handle) -> float:
        """S: minus the mean loss over the validation batches (eval mode, no gradients)."""
        model = handle.model
        if self.validation is not None:
            calls = [((), b) for b in self.validation]
        elif self._last is not None:
            calls = [self._last]
        else:
            raise LorazooError("ALoRA measures ranks on validation batches: call handle.schedule.set_validation("
                               "batches), or train through handle.before_step so it can use the last training batch")
        was = model.training
        model.eval()
        try:
            losses = []
            for args, kwargs in calls:
                out = model(*args, **kwargs)
                loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
                if loss is None:
                    raise LorazooError("ALoRA scores ranks by the model's loss: its validation batches must "
                                       "carry labels")
                losses.append(float(loss))
        finally:
            model.train(was)
        return -sum(losses) / len(losses)

    def importance(self, handle) -> dict[str, torch.Tensor]:
        """IS(r) of every active rank (study Eq. 50), by path; inactive slots read -inf."""
        forms = {p: ad.form for p, ad in handle.adapters().items()}
        saved = {p: f.rank_mask.clone() for p, f in forms.items()}
        scores = {p: torch.full((f.rank,), -math.inf, dtype=torch.float64) for p, f in forms.items()}
        try:
            s_full = self.performance(handle)
            for path, f in forms.items():
                for j in torch.nonzero(saved[path]).flatten().tolist():
                    f.rank_mask[j] = 0.0                        # M∖r
                    s_without = self.performance(handle)
                    f.rank_mask.copy_(saved[path])
                    for g in forms.values():                    # M_r: only r kept
                        g.rank_mask.zero_()
                    f.rank_mask[j] = 1.0
                    s_only = self.performance(handle)
                    for p, g in forms.items():
                        g.rank_mask.copy_(saved[p])
                    scores[path][j] = s_full - s_without + s_only
        finally:
            for p, g in forms.items():
                g.rank_mask.copy_(saved[p])
        return scores

    # --- the round ----------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        self.step = step
        ra.require_plan(self.rounds_at, "ALoRA", "alora_total_steps")
        if step in self.rounds_at:
            self.reallocate(handle, optimizer)

    @torch.no_grad()
    def reallocate(self, handle, optimizer) -> dict:
        adapters = handle.adapters()
        forms = {p: ad.form for p, ad in adapters.items()}
        scores = self.importance(handle)
        n = self.spec.options["alora_prune"] or len(forms)
        active = sum(int(f.rank_mask.sum()) for f in forms.values())
        n = min(n, active - 1)  # keep at least one rank
        paths = list(forms)
        flat = torch.cat([scores[p] for p in paths])
        order = torch.argsort(flat, stable=True).tolist()  # lowest first; inactive slots (-inf) come first
        offsets = [0]
        for p in paths:
            offsets.append(offsets[-1] + forms[p].rank)
        pruned: dict[str, list[int]] = {}
        for k in order:
            if sum(map(len, pruned.values())) == n:
                break
            li = max(i for i in range(len(paths)) if offsets[i] <= k)
            path, j = paths[li], k - offsets[li]
            if forms[path].rank_mask[j] == 0:
                continue
            pruned.setdefault(path, []).append(j)
        for path, js in pruned.items():
            f = forms[path]
            idx = torch.tensor(js, dtype=torch.long, device=f.rank_mask.device)
            f.rank_mask[idx] = 0.0
            f.B[:, idx] = 0.0
        # the freed budget goes to layers none of whose ranks was pruned, most important first
        layer_score = {p: float(scores[p][forms[p].rank_mask.bool().cpu()].sum()) for p in paths}
        free = lambda p: forms[p].rank - int(forms[p].rank_mask.sum())  # noqa: E731
        receivers = sorted((p for p in paths if p not in pruned), key=lambda p: -layer_score[p])
        added: dict[str, int] = {}
        left = sum(map(len, pruned.values()))
        while left:
            pool = [p for p in receivers if free(p) > 0] or sorted((p for p in paths if free(p) > 0),
                                                                   key=lambda p: -layer_score[p])
            for p in pool:
                if not left:
                    break
                self._add_rank(forms[p], optimizer)
                added[p] = added.get(p, 0) + 1
                left -= 1
        record = {"step": self.step, "pruned": {p: len(js) for p, js in pruned.items()}, "added": added}
        self.history.append(record)
        return record

    def _add_rank(self, f: ALoRA, optimizer) -> None:
        j = int(torch.nonzero(f.rank_mask == 0).flatten()[0])
        bound = 1 / math.sqrt(f.in_features)  # kaiming_uniform_(a=sqrt(5)), LoRA's A init
        f.A[j].uniform_(-bound, bound)
        f.B[:, j] = 0.0
        idx = torch.tensor([j], device=f.A.device)
        reset_optimizer_rows(optimizer, f.A, idx, 0)
        reset_optimizer_rows(optimizer, f.B, idx, 1)
        f.rank_mask[j] = 1.0

    # --- output, checkpoint -------------------------------------------------------------------
    def summary(self, handle):
        return {**ra.allocation_summary(handle), "rounds": list(self.history)}

    def state_dict(self):
        return {"step": self.step, "rounds_at": self.rounds_at, "history": list(self.history)}

    def load_state_dict(self, state):
        try:
            self.step = int(state.get("step", 0))
            rounds = state.get("rounds_at")
            self.rounds_at = None if rounds is None else [int(s) for s in rounds]
            self.history = list(state.get("history", []))
        except (TypeError, ValueError) as e:
            raise LorazooError(f"the ALoRA schedule state in the checkpoint is damaged ({e})") from None
