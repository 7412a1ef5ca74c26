"""ShareLoRA: LoRA with A, B or both shared across layers (Song et al. [47]; study Eq. 22-23).

h = W0 x + s·B(m ⊙ A x), where A (r, in), B (out, r), or both, are one trainable tensor shared by
several layers instead of one per layer.

What is followed, and the choices made:

- Sharing scope. The ShareLoRA paper shares "across different layers" and its code
  (Rain9876/ShareLoRA, ``peft_share``) keeps one shared weight per target name (``q_proj``,
  ``v_proj``, ...) for all the blocks: that is ``sharelora_scope="type"`` (the default), one bank
  per ``BuildContext.module_type`` (path with block indices wildcarded, and shape), so no slicing
  is needed. The study's Eq. 22-23 instead shares one pair across *all* targeted modules, stored at
  the largest input/output sizes and sliced to each layer, ``A^S[:, :in]``, ``B^S[:out]``:
  ``sharelora_scope="all"``.
- ``sharelora_share`` in {"A", "B", "AB"}: which factor is shared (the paper's ShareA, ShareB,
  ShareAB); "A" is the default, the paper's recommended configuration (LoRA's accuracy at about
  half its parameters). The other factor stays per layer.
- Init: LoRA's (A Kaiming-uniform with a = sqrt(5), B zero) for the shared and the local factors
  alike, as the authors' code (PEFT's LoRA init, applied to the shared weight once). Under
  ``scope="all"`` the shared A is drawn with fan_in = the largest input size. B = 0, so every
  layer starts as the base model.
- Trainable parameters (tested exactly): with T module types of L_t layers each (scope "type"),
  ShareA: Σ_t (r·in_t + L_t·r·out_t); ShareB: Σ_t (L_t·r·in_t + r·out_t); ShareAB: Σ_t r·(in_t +
  out_t); scope "all" replaces the per-type shared term by one r·max_in (or r·max_out).
- Not a plain per-layer B·A (a shared factor cannot be set per layer): factor inits (PiSSA...),
  LoRA-Pro and ReLoRA refuse it; ``up_params`` names the (local or shared) B for LoRA+.
- Cost: exactly LoRA's forward and backward (the slices are views); a shared tensor accumulates
  the gradients of every layer that uses it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..parts import Form, check_choice
from ..registry import FORMS
from .banks import AssembledPair

SHARES = {"A": "A shared, B per layer (ShareA)", "B": "B shared, A per layer (ShareB)",
          "AB": "both shared (ShareAB)"}
SCOPES = {"type": "one per module type (the authors' code)", "all": "one for all targets, sliced (study Eq. 22-23)"}


class SharedFactors(nn.Module):
    """Trainable LoRA factors shared by several layers: A (rank, in) and/or B (out, rank).

    Initialized as LoRA's own (A Kaiming-uniform a = sqrt(5), B zero) from the global generator,
    which ``adapt`` seeds with the spec's seed. ``which`` names the factors held ("A", "B", "AB").
    """

    def __init__(self, rank: int, in_features: int, out_features: int, which: str):
        super().__init__()
        if "A" in which:
            self.A = nn.Parameter(torch.empty(rank, in_features))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if "B" in which:
            self.B = nn.Parameter(torch.zeros(out_features, rank))


def shared_factors(form: Form, ctx, prefix: str, which: str, scope: str, rank: int) -> tuple[str, SharedFactors]:
    """Register (or find) the bank of shared factors ``which`` for ``form``'s layer: one per module
    type (``scope="type"``) or one per adapter at the largest shapes (``scope="all"``). Returns
    (bank key, bank); the form reads it back as ``getattr(form, f"_bank_{key}")``."""
    if scope == "type":
        key, fin, fout = f"{prefix}_{which}_r{rank}_{ctx.module_type()}", form.in_features, form.out_features
    else:
        key, fin, fout = f"{prefix}_{which}_r{rank}_all", ctx.max_in, ctx.max_out
    return key, form.use_bank(ctx, key, lambda: SharedFactors(rank, fin, fout, which))


@FORMS.register("sharelora", paper="ShareLoRA (Song et al., 2024) [47]",
                equations="study Eq. 22-23: ΔW = s·B^S[:out] A^S[:, :in]; ShareA / ShareB / ShareAB",
                summary="LoRA with A, B or both shared by the layers of a module type (or by all targets, "
                        "sliced), trainable")
class ShareLoRA(AssembledPair):
    """h = W0 x + s·B(m ⊙ A x), A and/or B shared (``sharelora_share``) per module type or by all
    targets (``sharelora_scope``). See the module docstring for the choices."""

    options = {"sharelora_share": "A", "sharelora_scope": "type"}
    plain_product = False  # a shared factor is not this layer's own: factor inits and LoRA-Pro refuse

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.build_factors(ctx, "sharelora", opts.get("sharelora_share", "A"), opts.get("sharelora_scope", "type"),
                           in_features, out_features, rank)

    def build_factors(self, ctx, bank: str, share: str, scope: str, in_features: int, out_features: int,
                      rank: int) -> None:
        """The shared factors (``share``: "A", "B" or "AB") from bank ``bank`` per ``scope``, own ones for the rest."""
        self.share, self.scope = share, scope
        self.bank_key, _ = shared_factors(self, ctx, bank, share, scope, rank)
        if "A" not in share:
            self.A = nn.Parameter(torch.empty(rank, in_features))
        if "B" not in share:
            self.B = nn.Parameter(torch.empty(out_features, rank))
        self.up_params = ("B",) if "B" not in share else (f"_bank_{self.bank_key}.B",)
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_choice("sharelora_share", opts["sharelora_share"], SHARES)
        check_choice("sharelora_scope", opts["sharelora_scope"], SCOPES)

    @property
    def bank(self) -> SharedFactors:
        return getattr(self, f"_bank_{self.bank_key}")

    def reset_parameters(self) -> None:
        """The local factor(s) as LoRA's; the shared ones were initialized once, with the bank."""
        if "A" not in self.share:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if "B" not in self.share:
            nn.init.zeros_(self.B)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (B (out, r), A (r, in)): its own, or views of the shared bank."""
        bank = self.bank
        A = bank.A[:, : self.in_features] if "A" in self.share else self.A
        B = bank.B[: self.out_features] if "B" in self.share else self.B
        return B, A
