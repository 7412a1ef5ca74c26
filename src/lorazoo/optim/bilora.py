"""BiLoRA: singular vectors and singular values trained on two splits of the data (ref [61]).

Qiang, Zhang & Xie, "BiLoRA: A Bi-level Optimization Framework for Overfitting-Resilient Low-Rank
Adaptation of Large Pre-trained Models" (2024); the study only names it. The update is AdaLoRA's
pseudo-SVD ΔW = s·P diag(λ) Q (form ``adalora``, reused as is). With the training data split into
D1 and D2, BiLoRA solves

    lower:  V*(λ) = argmin_V  C(V, λ; D1) + gamma·R(V),   V = (P, Q),
            R = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F  (AdaLoRA's orthogonality, study Eq. 35)
    upper:  min_λ  C(V*(λ), λ; D2)

by alternating steps. This optim part keeps two parameter groups, ``vectors`` (P, Q) and
``values`` (λ, learning rate times ``bilora_values_lr_ratio``), and decides in ``before_step``
which gradients the optimizer step may use; a parameter whose ``.grad`` is None is skipped by torch's
optimizers entirely (no momentum drift, no weight decay), so each group moves only on its own split:

- with validation batches (``handle.optim.set_validation(batches)``, the D2 split): every step
  updates P, Q on the training batch (D1); every ``bilora_interval``-th step λ also takes one step
  on the gradient of the loss on the next validation batch (one extra forward and backward), and
  on the other steps λ's gradient is dropped;
- without them the training stream itself is split: of every ``bilora_interval`` + 1 consecutive
  steps the first ``bilora_interval`` are D1 steps (P, Q move, λ's gradient dropped) and the last
  is a D2 step (λ moves, P's and Q's gradients dropped). No batch is ever used by both levels.

On D1 steps gamma·∇R is added to P's and Q's gradients in closed form (∂R/∂P = 4P(PᵀP − I),
∂R/∂Q = 4(QQᵀ − I)Q), since an optim part adds no loss term; gamma = ``bilora_orth_reg``.

Choices where the paper leaves room:
- The hypergradient is first-order: λ's gradient on D2 is taken at the current P, Q (the
  DARTS-first-order approximation; the paper computes it with the Betty library's approximations
  of ∂V*/∂λ). Lower and upper levels take one step each per round (``bilora_interval`` = 1).
- λ is the real-valued parameterization (the paper's first variant), as the ``adalora`` form has it;
  its init (λ = 0, P, Q ~ N(0, 0.02²)) and scale alpha/(r + 1e-5) are AdaLoRA's (the paper builds
  on AdaLoRA's parameterization), so the model starts as the base.
- gamma = 0.1 (``bilora_orth_reg``), AdaLoRA's orthogonality weight in PEFT's default config.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..forms.adalora import AdaLoRA
from ..parts import Optim, ValidationBatches, check_number
from ..registry import OPTIMS


@OPTIMS.register("bilora", paper="BiLoRA (Qiang, Zhang & Xie, 2024) [61]",
                 equations="ΔW = s·P diag(λ) Q; lower: P, Q on D1 with gamma·R(P, Q); upper: λ on D2; "
                           "alternating first-order steps",
                 summary="pseudo singular vectors trained on one data split, singular values on another, in turn")
class BiLoRA(ValidationBatches, Optim):  # set_validation: the D2 split, cycled one per upper step
    options = {"bilora_interval": 1, "bilora_orth_reg": 0.1, "bilora_values_lr_ratio": 1.0}

    @classmethod
    def validate(cls, opts):
        check_number("bilora_interval", opts["bilora_interval"], minimum=1, integer=True)
        check_number("bilora_orth_reg", opts["bilora_orth_reg"])
        check_number("bilora_values_lr_ratio", opts["bilora_values_lr_ratio"], strict=True)

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, AdaLoRA):
            raise SpecError(f"optim 'bilora' trains the singular vectors and values of form 'adalora' on two "
                            f"data splits; form '{form_cls.part_name}' has no singular values: use form='adalora'")

    def __init__(self, spec):
        super().__init__(spec)
        self.steps = 0        # optimizer steps seen (before_step calls)
        self.upper_steps = 0  # steps on which λ moved

    @staticmethod
    def _split(handle):
        forms = [ad.form for ad in handle.adapters().values()]
        return [p for f in forms for p in (f.P, f.Q)], [f.lam for f in forms]

    def param_groups(self, handle, lr, weight_decay):
        vectors, values = self._split(handle)
        ids = {id(p) for p in vectors + values}
        rest = [p for p in handle.trainable_parameters() if id(p) not in ids]  # modules_to_save: with D1
        ratio = self.spec.options["bilora_values_lr_ratio"]
        return [{"params": vectors + rest, "lr": lr, "weight_decay": weight_decay},
                {"params": values, "lr": lr * ratio, "weight_decay": weight_decay}]

    def is_upper(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) moves λ."""
        return step % (self.spec.options["bilora_interval"] + (self.validation is None)) == 0

    def before_step(self, handle, optimizer):
        self.steps += 1
        vectors, values = self._split(handle)
        upper = self.is_upper(self.steps)
        lower = self.validation is not None or not upper
        if upper:
            if self.validation is not None:
                self._values_grad_on_validation(handle, values)
            self.upper_steps += 1
        else:
            for p in values:
                p.grad = None
        if lower:
            self._add_orthogonality_grad(handle)
        else:
            for p in vectors:
                p.grad = None

    def _values_grad_on_validation(self, handle, values) -> None:
        batch = self.validation[self.upper_steps % len(self.validation)]
        with torch.enable_grad():
            out = handle.model(**batch)
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            if not torch.is_tensor(loss):
                raise LorazooError("BiLoRA's upper step needs the model's loss: validation batches must carry labels")
            grads = torch.autograd.grad(loss, values, allow_unused=True)
        for p, g in zip(values, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()

    @torch.no_grad()
    def _add_orthogonality_grad(self, handle) -> None:
        gamma = self.spec.options["bilora_orth_reg"]
        if not gamma:
            return
        for ad in handle.adapters().values():
            f = ad.form
            eye = torch.eye(f.P.shape[1], dtype=f.P.dtype, device=f.P.device)
            for p, g in ((f.P, 4 * f.P @ (f.P.T @ f.P - eye)), (f.Q, 4 * (f.Q @ f.Q.T - eye) @ f.Q)):
                p.grad = gamma * g if p.grad is None else p.grad.add_(g, alpha=gamma)

    def state_dict(self):
        return {"steps": self.steps, "upper_steps": self.upper_steps}

    def load_state_dict(self, state):
        try:
            self.steps = int(state.get("steps", 0))
            self.upper_steps = int(state.get("upper_steps", 0))
        except (TypeError, ValueError) as e:
            raise LorazooError(f"the BiLoRA optim state in the checkpoint is damaged ({e})") from None
