"""Shared pieces of the rank-allocation schedules (study II-B3): SaLoRA, SoRA, IncreLoRA, ALoRA.

Every allocation form keeps a 0/1 ``rank_mask`` buffer of shape (rank,) (saved with the adapter,
as AdaLoRA's); a rank is *active* when its mask entry is 1. These helpers read the per-layer
allocation from those masks, resolve step options given as counts or fractions of the run, and
compute the orthogonality regularizer of study Eq. 35 restricted to the active ranks.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..parts import check_number


def steps_of(name: str, value: float, total: int) -> int:
    """A step option: a count (>= 1) or, below 1, a fraction of the run's ``total`` steps."""
    return int(round(value * total)) if value < 1 else int(value)


def check_steps_option(name: str, value) -> None:
    check_number(name, value)
    if value >= 1 and value != int(value):
        raise SpecError(f"{name} is a step count (an integer) or a fraction of the run below 1, got {value!r}")


def check_total_steps(name: str, value) -> None:
    if value is not None:
        check_number(name, value, minimum=1, integer=True)


def require_plan(total, method: str, option: str) -> None:
    if total is None:
        raise LorazooError(
            f"{method}'s schedule needs the length of the run: set {option}=N in the spec, or call "
            f"handle.plan(total_steps=N) before training (lorazoo's trainer does)")


def active_ranks(handle) -> dict[str, int]:
    """Active ranks (``rank_mask`` entries equal to 1) of each layer of the adapter, by path."""
    return {p: int(ad.form.rank_mask.sum().item()) for p, ad in handle.adapters().items()}


def allocation_summary(handle) -> dict:
    """The per-layer allocation for training output: {"ranks": {path: n}, "total": N, "capacity": R}."""
    ranks = active_ranks(handle)
    capacity = sum(ad.form.rank for ad in handle.adapters().values())
    return {"ranks": ranks, "total": sum(ranks.values()), "capacity": capacity}


def masked_orthogonality(up: torch.Tensor, down: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖U_mᵀU_m − I_m‖²_F + ‖V_m V_mᵀ − I_m‖²_F (study Eq. 35) over the active ranks only.

    ``up`` (out, r), ``down`` (r, in), ``mask`` (r,) 0/1: columns of U and rows of V of inactive
    ranks are zeroed and their diagonal target is 0, so they add nothing (no pull on unused slots).
    With every rank active this is AdaLoRA's R(P, Q).
    """
    m = mask.to(up.dtype)
    u, v = up * m, down * m[:, None]
    eye = torch.diag(m)
    return (u.T @ u - eye).square().sum() + (v @ v.T - eye).square().sum()


def topk_mask(scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Global top-``keep`` over the concatenated per-layer scores; one bool mask per layer.

    Ties are broken by position (torch.topk on the concatenation), so exactly ``keep`` entries are
    True whenever ``keep`` <= the total size.
    """
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.reshape(-1).to(scores[0].device) for s in scores])
    if keep > flat.numel():
        raise LorazooError(f"cannot keep {keep} ranks of {flat.numel()}")
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        out[flat.topk(keep).indices] = True
    return list(out.split(sizes))
