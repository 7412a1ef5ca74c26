"""IncreLoRA's form (Zhang et al. 2023 [59]; study Eq. 45): ΔW = s·Σ_i λ_i p_i q_iᵀ over a growing set of ranks.

AdaLoRA's SVD-like form (``forms/adalora.py``: P (out, r), λ (r,), Q (r, in), λ = 0 and P, Q ~
N(0, 0.02²) at init) with the rank pre-allocated to its maximum ``rank`` and two saved 0/1 buffers:

- ``rank_mask``: the active ranks, the first ``increlora_init_rank`` at the start (the authors'
  ``lora_r`` = 1); the ``increlora`` schedule unmasks more as it grows the layer.
- ``reserve_mask``: "advance learning" (the authors' ``advance_learn``, on in their scripts): the
  next ``increlora_rank_per_step`` ranks already train p and q while λ is held at 1e-5 (set after
  the first step, when the authors' code creates its reserve, so the adapter starts exactly as the
  base model), so a rank added later starts from trained vectors. With ``increlora_advance=False``
  there is no reserve and a new rank starts from fresh random p, q and λ = 1e-5 (the study's
  description).

The forward uses λ ⊙ (rank_mask + reserve_mask); its cost is that of the maximum rank (r·(in + out)
per token, as LoRA-r), the price of keeping every shape fixed (see schedules/increlora.py).
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from ..schedules.rankalloc import masked_orthogonality
from .adalora import AdaLoRA

RESERVE_VALUE = 1e-5  # λ of a reserve or newly added rank (the authors' e = 1e-5)


def target_rank(opts: dict, rank: int) -> int:
    """The final average rank per layer: ``increlora_target_rank``, default half the maximum rank."""
    return opts["increlora_target_rank"] or max(opts["increlora_init_rank"], rank // 2)


def rank_per_step(opts: dict, rank: int) -> int:
    """Ranks a selected layer gains per growth step: the option, default half the target rank (the
    authors' table {2: 1, 4: 2, 6: 3, 8: 4})."""
    return opts["increlora_rank_per_step"] or max(1, target_rank(opts, rank) // 2)


@FORMS.register("increlora", paper="IncreLoRA (Zhang et al., 2023) [59]",
                equations="study Eq. 45; ΔW = s·Σ_i λ_i p_i q_iᵀ over the active (and reserve) ranks",
                summary="AdaLoRA's SVD form pre-allocated to the maximum rank; ranks unmasked as they grow")
class IncreLoRA(AdaLoRA):
    options = {"increlora_init_rank": 1, "increlora_target_rank": None, "increlora_rank_per_step": None,
               "increlora_advance": True}

    @classmethod
    def validate(cls, opts):
        check_number("increlora_init_rank", opts["increlora_init_rank"], minimum=1, integer=True)
        for key in ("increlora_target_rank", "increlora_rank_per_step"):
            if opts[key] is not None:
                check_number(key, opts[key], minimum=1, integer=True)
        if not isinstance(opts["increlora_advance"], bool):
            raise SpecError(f"increlora_advance must be True or False, got {opts['increlora_advance']!r}")

    @classmethod
    def check_spec(cls, spec):
        if spec.schedule == "adalora":
            raise SpecError("form 'increlora' grows its ranks with schedule 'increlora'; the 'adalora' schedule "
                            "prunes triplets and does not manage its reserve ranks (use form='adalora' for that)")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        self._init_rank = min(rank, int(opts["increlora_init_rank"]))
        self._reserve = rank_per_step(opts, rank) if opts["increlora_advance"] else 0
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.register_buffer("reserve_mask", torch.zeros(rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.rank_mask.zero_()
        self.rank_mask[: self._init_rank] = 1.0
        if hasattr(self, "reserve_mask"):
            self.reserve_mask.zero_()
            self.reserve_mask[self._init_rank: self._init_rank + self._reserve] = 1.0

    def alive(self) -> torch.Tensor:
        """Ranks that enter the forward: active or reserve (0/1)."""
        return self.rank_mask + self.reserve_mask

    def singular_values(self) -> torch.Tensor:
        return self.lam * self.alive()

    def orthogonality(self) -> torch.Tensor:
        """R(P, Q) of study Eq. 35 over the ranks in use (unused slots are not pulled)."""
        return masked_orthogonality(self.P, self.Q, self.alive())
