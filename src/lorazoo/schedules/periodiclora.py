"""PeriodicLoRA (PLoRA; Meng et al., 2024 [39]; study Sec. II-B1): periodic unloading of s·B·A into the
base, with momentum.

Every ``periodiclora_interval`` optimizer steps (the end of a PLoRA stage) each layer unloads a
fraction m = ``periodiclora_momentum`` of its update into the frozen base and keeps the rest of its
factors as the start of the next stage:

    W0 <- W0 + m·s·B·A,     B <- (1 − m)·B,     A <- (1 − m)·A.

This is the study's own implementation (its codebase, hhnqqq/MyTransformers:
``common/lora_modules/plora.py`` ``merge_and_reset_with_momentum`` with m = 0.1, called after
every optimizer step by ``train/dp_train.py``), whose defaults the preset takes (interval 1,
m = 0.1); the PLoRA paper's text was not available to check its exact formula. Consequences,
kept as in that code and tested: the model changes at an unload (the update s·B·A becomes
(m + (1 − m)²)·s·B·A, a shrink of the adapter's part by (1 − m)² that acts like a decay on it),
and the accumulated base change has rank above r (PLoRA's "breaking the low-rank bottleneck").
m = 1 is PLoRA without momentum (the paper's plain unloading): the whole update goes into the base
and the factors are re-initialized by the form (B = 0, so the output is unchanged) with their
optimizer state dropped; with m < 1 the optimizer state is kept, as in the study's code.

The unloads go through the adapter's base shift (``merging.fold``), so a saved adapter reproduces
its trained base and ``delete`` undoes it; merging every step would grow the shift by r rows a
step, so it is compacted to at most min(out, in) rows (an exact rewrite, ``merging.compact_shift``)
and later unloads add to it in place. Cost: one (out, r) x (r, in) product per layer and unload
(r·out·in FLOPs against the step's ~6·tokens·out·in: under 2 % at r = 8 and 512 tokens; the bench
measured 1.07x LoRA's step); memory: once the accumulated update passes rank min(out, in)/r unloads
its record is one dense (out, in) buffer per adapted layer, which is what a saved PLoRA adapter
must hold to reproduce its (full-rank) base change.
Resume needs no state beyond the step count and the adapter (which holds the shift).
"""
from __future__ import annotations

import torch

from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from .merging import check_plain_product, drop_state, fold, refuse_merged


@SCHEDULES.register("periodiclora", paper="PeriodicLoRA (Meng et al., 2024) [39]",
                    equations="study Sec. II-B1; every T steps W0 += m·s·B·A, B <- (1−m)B, A <- (1−m)A "
                              "(the study's code; m = 1: unload all and re-init)",
                    summary="periodically unload a momentum fraction of s·B·A into the base, keep the rest")
class PeriodicLoRA(Schedule):
    options = {"periodiclora_interval": 1, "periodiclora_momentum": 0.1}

    @classmethod
    def validate(cls, opts):
        check_number("periodiclora_interval", opts["periodiclora_interval"], minimum=1, integer=True)
        check_number("periodiclora_momentum", opts["periodiclora_momentum"], strict=True, maximum=1.0)

    @classmethod
    def check_form(cls, form_cls):
        check_plain_product(form_cls, "periodiclora", "unloads s·B·A into the base")

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        if step % self.spec.options["periodiclora_interval"]:
            return
        refuse_merged(handle, "PeriodicLoRA")
        m = self.spec.options["periodiclora_momentum"]
        for layer in handle.layers().values():
            ad = layer.adapters[handle.name]
            fold(layer, ad, m)
            if m >= 1.0:
                ad.form.reset_parameters()
                drop_state(optimizer, ad.form.parameters())
            else:
                for p in ad.form.factors():
                    p.mul_(1.0 - m)
