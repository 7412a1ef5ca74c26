"""AutoLoRA's meta-learned rank selection (Zhang et al., NAACL 2024, ref [58]; the study names it).

Bi-level search, then thresholding (AutoLoRA Sec. 3; official code ruz048/AutoLoRA,
``finetune/lora_glue.py``):

1. Search (the first ``autolora_search_steps`` steps). The form (forms/autolora.py) weights its
   rank-1 components by g = softmax(z). Each training step updates A and B on a training batch with
   g fixed (the trainer's optimizer; z is outside it); after it, ``after_step`` takes one meta step on
   the next validation batch: the validation loss L_val is differentiated with respect to every
   layer's z only, and z takes one Adam step (learning rate ``autolora_lr``, default 1e-3 with
   Adam's default betas, the code's ``torch.optim.Adam(param_a, lr=0.001)``).
2. Threshold (after step ``autolora_search_steps``): layer l keeps rank j iff g_{l,j} >= lambda,
   lambda = ``autolora_threshold`` (default 1/r, the code's ``softmax(a) >= 1/lora_dim``); the kept
   ranks go into the saved ``rank_mask`` and g becomes that 0/1 mask. Since max_j g_j >= mean = 1/r,
   every layer keeps at least one rank with the default lambda; with a larger lambda the top rank is
   kept anyway (a rank-0 layer has no defined scale).
3. Retrain: the paper and its code retrain a fresh LoRA with the selected ranks. Here
   (``autolora_retrain`` = True, default) the kept ranks are re-initialized as LoRA's (A rows
   Kaiming-uniform, B columns zero) and their rows of the optimizer state zeroed, and training goes on
   in the same run; with False the trained factors are kept, each kept column of B scaled by its g_j,
   so the update is continuous except for the pruned ranks.

Choices where the paper leaves room:
- The meta step is first-order: ∇_z L_val at the current A, B (what the official code does; the
  paper's Eq. 4 unrolls one inner step W' = W - xi·∇_W L_tr, xi -> 0 here). The validation backward
  tracks only z (A and B get no validation gradient; the code's shared ``.grad`` leaks validation
  gradients into the next training step, which is not reproduced).
- Validation batches: ``handle.schedule.set_validation(batches)``, cycled one per meta step (the
  code draws one search batch per step from a 30 % split of the training set). Without them the
  schedule uses the last training batch the model saw, recorded by a forward pre-hook (as ALoRA), so
  it still runs, but the search is then no longer bi-level; pass a held-out split.
- One run holds search and retraining: ``autolora_search_steps`` is a step count or, below 1, a
  fraction of the run planned by ``handle.plan`` (default 0.5).

Cost: during the search one more forward and backward (on a validation batch) per step, the
method's own cost; afterwards a step costs LoRA's at the pre-allocated rank. Budget: the number of
kept ranks is what the threshold selects (AutoLoRA has no fixed budget); it is exact with respect
to the rule (tested) and reported by ``summary``.
"""
from __future__ import annotations

import math

import torch

from ..errors import LorazooError, SpecError
from ..forms.autolora import AutoLoRA
from ..parts import Schedule, ValidationBatches, check_number
from ..registry import SCHEDULES
from . import rankalloc as ra
from .increlora import reset_optimizer_rows

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the official code


def _loss_of(out) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if not torch.is_tensor(loss):
        raise LorazooError("AutoLoRA's meta step needs the model's loss: its validation batches must carry labels")
    return loss


@SCHEDULES.register("autolora", paper="AutoLoRA (Zhang et al., NAACL 2024) [58]",
                    equations="g = softmax(z) per layer; z <- Adam(∇_z L_val) after each training step; "
                              "keep rank j iff g_j >= lambda (1/r); retrain the kept ranks",
                    summary="selection variables per rank meta-learned on validation batches, then thresholded")
class AutoLoRASchedule(ValidationBatches, Schedule):
    options = {"autolora_search_steps": 0.5, "autolora_lr": 1e-3, "autolora_threshold": None,
               "autolora_retrain": True, "autolora_total_steps": None}

    @classmethod
    def validate(cls, opts):
        ra.check_steps_option("autolora_search_steps", opts["autolora_search_steps"])
        if opts["autolora_search_steps"] == 0:
            raise SpecError("autolora_search_steps must be > 0")
        check_number("autolora_lr", opts["autolora_lr"], strict=True)
        if opts["autolora_threshold"] is not None:
            check_number("autolora_threshold", opts["autolora_threshold"], strict=True, maximum=1.0)
        if not isinstance(opts["autolora_retrain"], bool):
            raise SpecError(f"autolora_retrain must be True or False, got {opts['autolora_retrain']!r}")
        ra.check_total_steps("autolora_total_steps", opts["autolora_total_steps"])

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, AutoLoRA):
            raise SpecError(f"schedule 'autolora' selects the ranks of form 'autolora', not form "
                            f"'{form_cls.part_name}'; use form='autolora' (or the 'autolora' preset)")

    def __init__(self, spec):
        super().__init__(spec)
        self.search_until: int | None = None
        if spec.options["autolora_total_steps"] is not None:
            self.plan(spec.options["autolora_total_steps"])
        self.step = 0
        self.meta_steps = 0
        self.thresholded = False
        self._checked = False
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def plan(self, total_steps: int) -> None:
        T = self.spec.options["autolora_total_steps"] or total_steps
        self.search_until = max(1, ra.steps_of("autolora_search_steps", self.spec.options["autolora_search_steps"], T))

    # --- validation batches ---------------------------------------------------------------------
    # set_validation (ValidationBatches): batches for the meta steps, cycled
    def attach(self, handle):
        self.watch(handle)

    def _next_call(self):
        if self.validation is not None:
            return (), self.validation[self.meta_steps % len(self.validation)]
        if self._last is not None:
            return self._last
        raise LorazooError("AutoLoRA's meta step needs validation batches: call handle.schedule.set_validation("
                           "batches), or train through the handle so it can use the last training batch")

    # --- the meta step ----------------------------------------------------------------------------
    def meta_step(self, handle) -> None:
        """One first-order Adam step on every layer's selection logits z with ∇_z L_val."""
        forms = {p: ad.form for p, ad in handle.adapters().items()}
        logits = [f.logits for f in forms.values()]
        args, kwargs = self._next_call()
        model = handle.model
        was = model.training
        flags = [z.requires_grad for z in logits]
        try:
            for z in logits:
                z.requires_grad_(True)
            with torch.enable_grad():
                loss = _loss_of(model(*args, **kwargs))
                grads = torch.autograd.grad(loss, logits, allow_unused=True)
        finally:
            for z, f in zip(logits, flags):
                z.requires_grad_(f)
            model.train(was)
        self.meta_steps += 1
        t = self.meta_steps
        lr = self.spec.options["autolora_lr"]
        with torch.no_grad():
            for (path, f), g in zip(forms.items(), grads):
                if g is None:
                    g = torch.zeros_like(f.logits)
                m, v = self.moments.get(path) or (torch.zeros_like(f.logits), torch.zeros_like(f.logits))
                m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
                v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
                self.moments[path] = (m, v)
                step = lr / (1 - BETAS[0] ** t)
                denom = (v / (1 - BETAS[1] ** t)).sqrt().add_(EPS)
                f.logits.addcdiv_(m, denom, value=-step)

    def threshold(self, handle, optimizer=None) -> dict[str, int]:
        """Keep rank j of a layer iff softmax(z)_j >= lambda; g becomes the kept-rank mask."""
        kept = {}
        with torch.no_grad():
            for path, ad in handle.adapters().items():
                f = ad.form
                g = torch.softmax(f.logits, dim=0)
                lam = self.spec.options["autolora_threshold"] or 1.0 / f.rank
                keep = g >= lam
                keep[int(torch.argmax(g))] = True
                if self.spec.options["autolora_retrain"]:
                    bound = 1 / math.sqrt(f.in_features)  # LoRA's A init (kaiming_uniform, a = sqrt 5)
                    f.A.uniform_(-bound, bound)
                    f.B.zero_()
                    idx = torch.arange(f.rank, device=f.A.device)
                    reset_optimizer_rows(optimizer, f.A, idx, 0)
                    reset_optimizer_rows(optimizer, f.B, idx, 1)
                else:
                    f.B.mul_(g.to(f.B.dtype))
                    f.B[:, ~keep] = 0.0
                f.rank_mask.copy_(keep.to(f.rank_mask.dtype))
                f.autolora_search.fill_(0.0)
                kept[path] = int(keep.sum())
        self.thresholded = True
        return kept

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        self.step = step
        ra.require_plan(self.search_until, "AutoLoRA", "autolora_total_steps")
        if not self._checked:  # a loaded adapter may already be past its search (the saved buffer says)
            self._checked = True
            self.thresholded = self.thresholded or any(
                float(ad.form.autolora_search) == 0 for ad in handle.adapters().values())
        if self.thresholded:
            return
        if step <= self.search_until:
            self.meta_step(handle)
        if step >= self.search_until:
            self.threshold(handle, optimizer)

    # --- output, checkpoint -------------------------------------------------------------------------
    def summary(self, handle):
        return {**ra.allocation_summary(handle), "searching": not self.thresholded, "meta_steps": self.meta_steps}

    def state_dict(self):
        state = {"step": self.step, "search_until": self.search_until, "meta_steps": self.meta_steps,
                 "thresholded": self.thresholded}
        for path, (m, v) in self.moments.items():
            state[f"m.{path}"], state[f"v.{path}"] = m.detach().clone(), v.detach().clone()
        return state

    def load_state_dict(self, state):
        try:
            self.step = int(state.get("step", 0))
            until = state.get("search_until")
            self.search_until = None if until is None else int(until)
            self.meta_steps = int(state.get("meta_steps", 0))
            self.thresholded = bool(state.get("thresholded", False))
            self.moments = {k[2:]: (state[k].clone(), state["v." + k[2:]].clone())
                            for k in state if k.startswith("m.")}
        except (TypeError, ValueError, KeyError) as e:
            raise LorazooError(f"the AutoLoRA schedule state in the checkpoint is damaged ({e})") from None
