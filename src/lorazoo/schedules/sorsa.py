"""SORSA's orthonormal regularizer (Cao, 2024 [81]; study Eq. 98), for the SVD form set up by init ``sorsa``.

    L_reg = mean over the adapter's P and Q matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F

and its gradient is added with the weight γ/η (γ = ``sorsa_gamma``, 4e-4 as the authors' scripts; η
the base learning rate) after the task gradient is formed and clipped and before the optimizer
step, as the authors' trainer does (``s_gamma = gamma / learning_rate``;
``accelerator.backward(s_gamma * ortho_loss)`` right before ``optimizer.step()``): dividing by η makes
γ the size of the regularizer's own SGD step. This runs in ``before_step`` (the trainer calls it
after clipping); η is the optimizer's ``base_lr`` (lorazoo's trainer) or else its group's ``lr``.
Choices: the authors' norm is the plain Frobenius norm averaged over the matrices (their
``calc_ortho``); the study's Eq. 98 writes the sum of squared norms. We follow the code, whose
gradient is what was trained with. The term is not added to the reported loss (``aux_loss`` is
None), as in the authors' logs, where it is a separate "orthonormality" entry; ``orthonormality``
gives it. The schedule has no state to checkpoint.
"""
from __future__ import annotations

import torch

from ..inits.sorsa import check_svd_form
from ..parts import Schedule, check_number
from ..registry import SCHEDULES


def orthonormality(handle) -> torch.Tensor:
    """Mean of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F over the adapter's layers (differentiable)."""
    terms = []
    for ad in handle.adapters().values():
        f = ad.form
        eye = torch.eye(f.rank, dtype=f.P.dtype, device=f.P.device)
        terms += [torch.linalg.matrix_norm(f.P.T @ f.P - eye), torch.linalg.matrix_norm(f.Q @ f.Q.T - eye)]
    return torch.stack(terms).mean()


@SCHEDULES.register("sorsa", paper="SORSA (Cao, 2024) [81]",
                    equations="study Eq. 98 (authors' code: mean Frobenius norms), gradient weight γ/η",
                    summary="orthonormal regularizer on the singular vectors, applied as a γ-sized step")
class SORSARegularizer(Schedule):
    options = {"sorsa_gamma": 4e-4}

    @classmethod
    def validate(cls, opts):
        check_number("sorsa_gamma", opts["sorsa_gamma"])

    @classmethod
    def check_form(cls, form_cls):
        check_svd_form(form_cls, "schedule 'sorsa'")

    def before_step(self, handle, optimizer):
        gamma = self.spec.options["sorsa_gamma"]
        if gamma == 0:
            return
        group = optimizer.param_groups[0] if optimizer is not None else {}
        lr = group.get("base_lr", group.get("lr"))
        if not lr:
            return  # no optimizer (or lr 0): no step for the regularizer to size
        with torch.enable_grad():
            (gamma / lr * orthonormality(handle)).backward()
