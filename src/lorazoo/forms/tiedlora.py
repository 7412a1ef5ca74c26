"""Tied-LoRA: A and B tied across layers, per-layer scaling vectors u, v (Renduchintala et al. [53]).

Tied-LoRA (NAACL 2024), as the study summarizes it (Sec. II-B2, "upon the architecture of VeRA",
Eq. 24-26): h = W0 x + s·Λ_v B Λ_u A x, Λ_u = diag(u) (r), Λ_v = diag(v) (out). A (r, in) and
B (out, r) are tied, i.e. one pair for all the layers of a module type (the paper's runs, in
NeMo, adapt the fused QKV projection of every block: a single type); u and v are per layer. Its
"selective training" freezes some of A, B, u, v: ``tiedlora_train`` names the ones that train,
any non-empty subset of "A", "B", "u", "v" (e.g. "ABuv", "Buv", "uv"); the others stay at their
init.

What is followed, and the choices made (the paper's full text was not reachable from this
environment, only its abstract and the study's summary; the points below say what rests on what):

- Default ``tiedlora_train="ABuv"``: everything trains, tied. The abstract's recommended
  configuration matches LoRA "with 13 % of its parameters": on its LLaMA-2-7B QKV setting (L = 32,
  in = 4096, out = 3·4096, r = 8) tied A, B plus per-layer v (and u) give r(in + out) + L(out + r)
  = 12.5 % of LoRA's L·r(in + out), which needs A, B and v trainable; u (r per layer) is
  negligible either way. Freezing variants are all accepted.
- Init: one trainable factor starts at zero so the model starts as the base, whatever the
  variant: if B trains, A Kaiming-uniform (a = sqrt(5)), B = 0, u = v = 1 (LoRA's init, with
  identity scalings); else if v trains, A and B Kaiming-uniform, u = 1, v = 0 (VeRA's rule);
  else if u trains, A and B Kaiming-uniform, u = 0, v = 1; else (only A trains) A = 0, B
  Kaiming-uniform, u = v = 1 (B's Kaiming bound 1/sqrt(r), a = sqrt(5) as A's). Each rule leaves a
  nonzero gradient on the zero factor (tested). Frozen tensors are marked ``_lorazoo_frozen`` (as
  LoRA-FA): saved, never trained. LoRA+ is refused when neither B nor v trains (no up-projection).
- s comes from the scale part (LoRA's α/r by default, the paper builds on LoRA's scaling).
- Trainable parameters (tested): per module type t with L_t layers, [A]·r·in_t + [B]·r·out_t +
  L_t·([u]·r + [v]·out_t), [X] = 1 if X trains.
- Not a per-layer B·A: factor inits, LoRA-Pro, ReLoRA refuse it. Cost: LoRA's matmuls; v scales
  B's rows (out x r) before the up-projection, so no (tokens x out) product is kept for it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import Form
from ..registry import FORMS
from .sharelora import SharedFactors

PARTS = "ABuv"


def _zero_start(train: str) -> str:
    """The trainable tensor that starts at zero (see the module docstring)."""
    return next(p for p in "BvuA" if p in train)


def _tied_pair(rank: int, in_features: int, out_features: int, train: str) -> SharedFactors:
    """The tied pair of one module type, initialized for the variant ``train``; frozen factors marked."""
    bank = SharedFactors(rank, in_features, out_features, "AB")  # A Kaiming-uniform, B zero
    zero = _zero_start(train)
    with torch.no_grad():
        if zero != "B":
            nn.init.kaiming_uniform_(bank.B, a=math.sqrt(5))
        if zero == "A":
            bank.A.zero_()
    for name in "AB":
        if name not in train:
            getattr(bank, name)._lorazoo_frozen = True
    return bank


@FORMS.register("tiedlora", paper="Tied-LoRA (Renduchintala, Konuk & Kuchaiev, NAACL 2024) [53]",
                equations="ΔW = s·Λ_v B Λ_u A, A and B tied across layers (study Sec. II-B2, on VeRA's Eq. 24-26)",
                summary="one trainable A, B per module type, per-layer scaling vectors u (r) and v (out); "
                        "which of A, B, u, v train is an option")
class TiedLoRA(Form):
    """h = W0 x + s·Λ_v B Λ_u (m ⊙ A x), A and B tied per module type (see the module docstring)."""

    options = {"tiedlora_train": "ABuv"}
    plain_product = False  # the tied pair is not this layer's own: factor inits and LoRA-Pro refuse

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.train_parts = str(opts.get("tiedlora_train", "ABuv"))
        self.bank_key = f"tiedlora_{''.join(sorted(self.train_parts))}_r{rank}_{ctx.module_type()}"
        self.use_bank(ctx, self.bank_key, lambda: _tied_pair(rank, in_features, out_features, self.train_parts))
        self.u = nn.Parameter(torch.empty(rank))
        self.v = nn.Parameter(torch.empty(out_features))
        for name in "uv":
            if name not in self.train_parts:
                getattr(self, name)._lorazoo_frozen = True
        self.up_params = tuple(p for p, on in ((f"_bank_{self.bank_key}.B", "B" in self.train_parts),
                                               ("v", "v" in self.train_parts)) if on) or None
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        value = opts["tiedlora_train"]
        if (not isinstance(value, str) or not value or set(value) - set(PARTS)
                or len(set(value)) != len(value)):
            raise SpecError(f"tiedlora_train must name the tensors that train, a non-empty string of distinct "
                            f"letters from 'A', 'B', 'u', 'v' (e.g. 'ABuv', 'Buv', 'uv'), got {value!r}")

    @classmethod
    def check_spec(cls, spec):
        train = spec.options["tiedlora_train"]
        if spec.optim == "loraplus" and "B" not in train and "v" not in train:
            raise SpecError(f"optim 'loraplus' speeds up the up-projection (B or v), and tiedlora_train={train!r} "
                            f"freezes both; train B or v, or use optim='default'")

    @property
    def bank(self) -> SharedFactors:
        return getattr(self, f"_bank_{self.bank_key}")

    def reset_parameters(self) -> None:
        zero = _zero_start(self.train_parts)
        with torch.no_grad():
            self.u.fill_(0.0 if zero == "u" else 1.0)
            self.v.fill_(0.0 if zero == "v" else 1.0)

    def forward(self, x, y, weight, mask=None):
        bank = self.bank
        h = self.rank_masked(F.linear(x, bank.A) * self.u, mask)
        return y + F.linear(h * self.scale, bank.B * self.v[:, None])

    def delta_weight(self, weight):
        bank = self.bank
        return (self.v[:, None] * bank.B) @ (self.u[:, None] * bank.A) * self.scale
