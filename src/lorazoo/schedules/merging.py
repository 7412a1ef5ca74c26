"""Shared steps of the merge-into-the-base schedules (PeriodicLoRA, CoLA, XGBLoRA; Delta-LoRA's check).

- :func:`check_plain_product`: the form's update must be a mergeable additive s·B·A.
- :func:`fold`: W0 += c·s·B·A through ``Adapter.shift_base`` (so save/load/delete reproduce and undo
  it), then :func:`compact_shift`.
- :func:`compact_shift`: a base shift of k > min(out, in) rows is rewritten as one exact factor pair
  of min(out, in) rows (I·P or P·I with P = shift_B·shift_A), so schedules that merge every step
  (PeriodicLoRA) keep a shift no larger than the weight itself instead of growing by r rows a step.
  The weight is not touched (the product is the same up to one rounding); later folds add to the
  dense side in place (one (out, r) x (r, in) product). A full-rank accumulated update costs one
  (out, in) buffer per layer: that is what the saved adapter must hold to reproduce the base.
- :func:`drop_state`: forget a parameter's optimizer state (the next step starts it afresh).
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..parts import Form


def check_plain_product(form_cls, name: str, why: str) -> None:
    """SpecError unless ``form_cls`` is a mergeable additive s·B·A (what merge/delta schedules need)."""
    if (form_cls.factors is Form.factors or not form_cls.plain_product or not form_cls.mergeable
            or form_cls.multiplicative or form_cls.reads_output):
        raise SpecError(
            f"schedule '{name}' {why}, which needs a mergeable additive form whose update is s·B·A; form "
            f"'{form_cls.part_name}' is not one: use form='lora', or schedule='none'")


def refuse_merged(handle, what: str) -> None:
    if handle.merged:
        raise LorazooError(f"adapter {handle.name!r} is merged; unmerge() it before training with {what}")


@torch.no_grad()
def compact_shift(adapter) -> None:
    """Rewrite a base shift longer than min(out, in) rows as an exact pair of min(out, in) rows."""
    out_f, in_f = adapter.shift_B.shape[0], adapter.shift_A.shape[1]
    if adapter.shift_A.shape[0] <= min(out_f, in_f):
        return
    P = adapter.shift_B @ adapter.shift_A
    if out_f <= in_f:
        adapter.shift_B, adapter.shift_A = torch.eye(out_f, dtype=P.dtype, device=P.device), P
    else:
        adapter.shift_B, adapter.shift_A = P, torch.eye(in_f, dtype=P.dtype, device=P.device)


def _dense_side(adapter) -> str | None:
    """"B" or "A" when the shift is already compacted (the other side an identity), else None."""
    out_f, in_f = adapter.shift_B.shape[0], adapter.shift_A.shape[1]
    n, k = min(out_f, in_f), adapter.shift_A.shape[0]
    if k != n:
        return None
    if out_f <= in_f and torch.equal(adapter.shift_B, torch.eye(n, dtype=adapter.shift_B.dtype,
                                                                device=adapter.shift_B.device)):
        return "A"
    if out_f > in_f and torch.equal(adapter.shift_A, torch.eye(n, dtype=adapter.shift_A.dtype,
                                                               device=adapter.shift_A.device)):
        return "B"
    return None


@torch.no_grad()
def fold(layer, adapter, coefficient: float = 1.0) -> None:
    """W0 += coefficient·s·B·A on ``layer`` (recorded in the adapter's base shift).

    Once the shift is compacted, the product is added to its dense side in place: one
    (out, r) x (r, in) product per fold, never the (out, k) x (k, in) recompaction."""
    B, A = adapter.form.factors()
    B = (coefficient * adapter.form.scale) * B.detach()
    side = _dense_side(adapter)
    if side is None:
        adapter.shift_base(layer.linear_weight(), B, A.detach())
        compact_shift(adapter)
        return
    weight = layer.linear_weight()
    delta = B.to(weight) @ A.detach().to(weight)
    weight.add_(delta)
    (adapter.shift_A if side == "A" else adapter.shift_B).add_(delta.to(adapter.shift_A))


def drop_state(optimizer, params) -> None:
    """Forget the optimizer state of ``params`` (Adam's moments and step count restart)."""
    if optimizer is None:
        return
    for p in params:
        optimizer.state.pop(p, None)
