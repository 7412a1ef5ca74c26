"""Delta-LoRA (Zi et al., 2023 [153], Algorithm 1): the frozen base follows the delta of s·B·A.

After each optimizer step t (0-based, the paper's loop index) with t > K, the pre-trained weight
is moved by the change the step made to the low-rank product, times the update ratio λ:

    W^(t+1) = W^(t) + λ·s·(B^(t+1) A^(t+1) − B^(t) A^(t))        (Algorithm 1; s = alpha / r)

K = ``delta_lora_start`` (500) and λ = ``delta_lora_ratio`` (2), the paper's settings. The deltas
telescope, so after step T the base is W0 + λ·s·(B_T A_T − B_K' A_K'), with B_K' A_K' the factors
after step K+1 (t = K), where the updates start. That is what is recorded: at t = K the adapter's
base shift gets a block of 2r rows, [λs·B_K', −λs·B_K'] · [A_K'; A_K'] (product zero, the weight
untouched); each later step adds λs(B_t A_t − B_{t-1} A_{t-1}) to the weight, in one (out, 2r) x
(2r, in) product, and overwrites the block's first half with the new λs·B_t, A_t. So the base
shift always equals the base's total change (up to the rounding of the per-step sums), and a
saved adapter reproduces the trained base exactly: ``lorazoo.load`` applies base + shift, and
``delete`` undoes it. The block costs 2r rows per layer, what the authors' code keeps anyway (the
previous A and B). Cost per step past K: one (out, 2r) x (2r, in) product per layer (4r·out·in FLOPs
against the step's ~6·tokens·out·in; the bench measured 1.05x LoRA's step with K = 0).

Choices and refusals: the paper removes dropout from the LoRA branch so that ∂L/∂(BA) is the
weight's gradient; ``dropout`` and ``rank_dropout`` > 0 are refused, as are forms whose update is
not a mergeable additive s·B·A (DoRA, LoRMA, MoSLoRA: "the delta of AB" is not their update).
Training while merged is refused (the base would move under the merge). The started/not-started
state goes through ``TrainingState`` for resumes; a saved adapter loaded and trained again starts
a new block at its own step K (the earlier block stays as a fixed base shift, like PiSSA's).
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from .merging import check_plain_product, refuse_merged


@SCHEDULES.register("delta_lora", paper="Delta-LoRA (Zi et al., 2023) [153]",
                    equations="Algorithm 1: W^(t+1) = W^(t) + λ·s·(B^(t+1)A^(t+1) − B^(t)A^(t)) for t > K",
                    summary="after each step past K, the base weight moves by λ times the step's change of s·B·A")
class DeltaLoRA(Schedule):
    options = {"delta_lora_ratio": 2.0, "delta_lora_start": 500}

    @classmethod
    def validate(cls, opts):
        check_number("delta_lora_ratio", opts["delta_lora_ratio"], strict=True)
        check_number("delta_lora_start", opts["delta_lora_start"], integer=True)

    @classmethod
    def check_form(cls, form_cls):
        check_plain_product(form_cls, "delta_lora", "moves the base by the change of s·B·A")

    @classmethod
    def check_spec(cls, spec):
        if spec.dropout > 0 or spec.rank_dropout > 0:
            raise SpecError(
                f"schedule 'delta_lora' needs the low-rank branch without dropout (the paper removes it, so "
                f"that the gradient of B·A is the weight's); got dropout={spec.dropout}, "
                f"rank_dropout={spec.rank_dropout}: set both to 0")

    def __init__(self, spec):
        super().__init__(spec)
        self.started = False

    def state_dict(self):
        """Whether the base-shift block exists yet (the block itself is in the adapter's shift)."""
        return {"started": self.started}

    def load_state_dict(self, state):
        self.started = bool(state.get("started", False))

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        K = self.spec.options["delta_lora_start"]
        t = step - 1  # the paper's 0-based iteration index
        if t < K:
            return
        refuse_merged(handle, "Delta-LoRA")
        ratio = self.spec.options["delta_lora_ratio"]
        for layer in handle.layers().values():
            ad = layer.adapters[handle.name]
            B, A = ad.form.factors()
            new_B = (ratio * ad.form.scale) * B.detach().to(ad.shift_B)
            new_A = A.detach().to(ad.shift_A)
            if not self.started:  # t = K (or the first step seen past it): the block, zero product
                ad.shift_B = torch.cat([ad.shift_B, new_B, -new_B], dim=1)
                ad.shift_A = torch.cat([ad.shift_A, new_A, new_A], dim=0)
                continue
            r = B.shape[1]
            k = ad.shift_A.shape[0] - 2 * r  # the block is the last 2r rows
            old_B, old_A = ad.shift_B[:, k:k + r], ad.shift_A[k:k + r]
            weight = layer.linear_weight()
            weight.add_(torch.cat([new_B, -old_B], dim=1).to(weight) @ torch.cat([new_A, old_A], dim=0).to(weight))
            old_B.copy_(new_B)
            old_A.copy_(new_A)
        self.started = True
