"""RaSA: rank-sharing LoRA, local ranks plus a pool of ranks shared across layers (He et al. [49]).

Study Eq. 27: ΔW = [B^L  B^S] D [A^L; A^S], D diagonal and trainable per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import Form, check_number
from ..registry import FORMS
from .banks import SharedPair
from .lora import LoRA


@FORMS.register("rasa", paper="RaSA (He et al., 2025, 'Rank-Sharing Low-Rank Adaptation') [49]",
                equations="study Eq. 27: ΔW = [B_L B_S] D [A_L; A_S]; effective rank (r - k) + L·k",
                summary="r - k local ranks plus k·L ranks pooled across the L layers of a module type, "
                        "with a trainable diagonal D per layer")
class RaSA(Form):
    """h = W0 x + [B_L B_S] diag(D) (m ⊙ [A_L; A_S] x).

    Local: A_L (r - k, in), B_L (out, r - k). Shared: A_S (k·L, in), B_S (out, k·L), one pair per
    module type (``BuildContext.module_type``: the layer's path with block indices wildcarded, and
    its shape), pooled from the k ranks each of its L layers gives up; trainable, stored once, and
    trained by every layer of the type. D (hidden,) with hidden = (r - k) + k·L is per layer, so the
    update's rank reaches min((r - k) + k·L, in, out) for the parameters of a rank-r LoRA (plus
    hidden entries of D). ``rank_bound`` says so; ``self.rank`` is this hidden size (rank masks
    and rank dropout act on it), the spec's r is ``self.r``.

    As the authors' code (zwhe99/RaSA, peft/tuners/rasa): A_L, A_S Kaiming-uniform (a = sqrt(5)),
    B_L, B_S zero (so ΔW = 0 at init), D's local entries 0.5·α/(r - k) and its shared entries
    0.5·α/(k·L), and no other scaling (``scaling = 1``): D carries α. Here α = s·r with s from
    the scale part (the authors set rasa_alpha = lora_alpha, i.e. s = α/r with the default
    scale), so the default scale reproduces their init exactly and rsLoRA etc. rescale D's init.
    Module types: the authors group layers by the name after ``layers.<i>.`` and require one shape
    per group; lorazoo wildcards every numeric path part and splits a group by shape. A type with
    a single layer (L = 1) is plain LoRA with a diagonal. ``rasa_k`` = 1 is the study's setting
    (Sec. IV-C4) and the authors' default; k may equal r (no local ranks).
    """

    options = {"rasa_k": 1}
    rank_bound = "min(r - k + L·k, in, out)"
    plain_product = False  # B·diag(D)·A with shared parts: factor inits and LoRA-Pro refuse it

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        k = int(opts.get("rasa_k", 1))
        if k > rank:
            raise SpecError(f"rasa_k ({k}) must be at most the layer's rank ({rank}); lower rasa_k")
        self.r, self.k = rank, k
        self.layers_shared = len(ctx.same_type())  # L
        self.bank_key = f"rasa_k{k}_{ctx.module_type()}"
        self.use_bank(ctx, self.bank_key, lambda: SharedPair(k * self.layers_shared, in_features, out_features))
        self.local = rank - k
        self.rank = self.local + k * self.layers_shared  # the hidden size: masks act on it
        self.alpha = scale * rank  # the authors' rasa_alpha
        self.A = nn.Parameter(torch.empty(self.local, in_features))
        self.B = nn.Parameter(torch.empty(out_features, self.local))
        self.D = nn.Parameter(torch.empty(self.rank))
        # LoRA+ puts both up-projections (local and shared B) in its fast group
        self.up_params = ("B", f"_bank_{self.bank_key}.B")
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_number("rasa_k", opts["rasa_k"], minimum=1, integer=True)

    @classmethod
    def check_spec(cls, spec):
        if spec.options["rasa_k"] > spec.rank:
            raise SpecError(f"rasa_k ({spec.options['rasa_k']}) must be at most rank ({spec.rank}): "
                            f"each layer gives k of its r ranks to the shared pool; lower rasa_k or raise rank")

    @property
    def bank(self) -> SharedPair:
        return getattr(self, f"_bank_{self.bank_key}")

    def reset_parameters(self) -> None:
        with torch.no_grad():
            shared = self.k * self.layers_shared
            if self.local:
                LoRA.reset_parameters(self)  # local A Kaiming-uniform, local B zero
                self.D[: self.local].fill_(0.5 * self.alpha / self.local)
            self.D[self.local:].fill_(0.5 * self.alpha / shared)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B_L B_S] (out, hidden), [A_L; A_S] (hidden, in))."""
        bank = self.bank
        return torch.cat([self.B, bank.B], dim=1), torch.cat([self.A, bank.A], dim=0)

    def forward(self, x, y, weight, mask=None):
        B, A = self.stacked()
        h = self.rank_masked(F.linear(x, A), mask)
        # D scales B's columns (out x hidden) rather than the (tokens x hidden) activations
        return y + F.linear(h, B * self.D)

    def delta_weight(self, weight):
        B, A = self.stacked()
        return (B * self.D) @ A
