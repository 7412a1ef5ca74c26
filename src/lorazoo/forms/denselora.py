"""DenseLoRA: a shared encoder/decoder per module type and a dense r x r matrix per layer (Mu et al. [50]).

Study Eq. 33: ΔW = (α/r)·A^S C B^S (in lorazoo's (out, in) layout s·B M A); the authors' code adds
GELU after the encoder and after the decoder.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotMergeableError
from ..parts import Form, check_choice
from ..registry import FORMS
from .autocast import promoted
from .banks import SharedPair

ACTIVATIONS = {"gelu": F.gelu, "identity": None}


class GeluDecode(torch.autograd.Function):
    """GELU(h B^T) keeping only h (tokens x r) and B for backward, recomputing h B^T there: autograd
    would keep the (tokens x out) pre-activation per layer, about LoRA's whole saved memory again."""

    @staticmethod
    def forward(ctx, h, B):
        ctx.save_for_backward(h, B)
        return F.gelu(F.linear(h, B))

    @staticmethod
    def backward(ctx, grad):
        h, B, grad = promoted(*ctx.saved_tensors, grad)
        dz = torch.ops.aten.gelu_backward(grad, F.linear(h, B))
        return (dz @ B if ctx.needs_input_grad[0] else None,
                dz.flatten(0, -2).t() @ h.flatten(0, -2) if ctx.needs_input_grad[1] else None)


@FORMS.register("denselora", paper="DenseLoRA (Mu et al., ACL 2025) [50]",
                equations="study Eq. 33: ΔW = s·B_S M A_S; authors' code: s·σ(B_S M σ(A_S x)), σ = GELU",
                summary="encoder A and decoder B shared by the layers of a module type, trainable; a dense "
                        "r x r matrix M per layer; GELU around M as in the authors' code")
class DenseLoRA(Form):
    """h = W0 x + s·σ(B_S M σ(m ⊙ A_S x)), σ = GELU (``denselora_activation="gelu"``, default) or
    the identity (``"identity"``: exactly the study's Eq. 33, s·B_S M A_S, mergeable).

    A_S (r, in) is the encoder and B_S (out, r) the decoder, one trainable pair per module type
    (``BuildContext.module_type``: path with block indices wildcarded, and shape), stored once and
    trained by every layer of the type; M (r, r) is per layer. Inits as the authors' code
    (mulin-ahu/DenseLoRA and LoRAFactory's port): encoder and M Kaiming-uniform (a = sqrt(5)),
    decoder zero, so the update starts at zero (GELU(0) = 0). s = α/r from the scale part.

    Choices: the authors group layers by projection name (q, k, v, up, down) and LoRAFactory by
    the name after ``layers.<i>.``; lorazoo wildcards every numeric path part and splits by shape.
    With GELU the update depends on x nonlinearly: not mergeable (``delta_weight`` refuses). The
    rank mask acts on σ(A_S x), before M. The rank is not bounded by a layer's shape (the study
    uses r = 24 x LoRA's rank, 192, on every module, with α = 2r); the update's rank, where it is
    linear, is at most min(r, in, out). Not a plain B·A product: factor inits are refused.
    Cost: the outer GELU is an elementwise pass over (tokens x out) each way that LoRA has not;
    ``GeluDecode`` recomputes its input in backward so the saved memory stays LoRA's.
    """

    options = {"denselora_activation": "gelu"}
    mergeable = False  # the default (GELU) update depends on x; "identity" makes an instance mergeable
    rank_bound = "min(r, in, out) (identity activation)"

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.activation = opts.get("denselora_activation", "gelu")
        self.act = ACTIVATIONS[self.activation]
        self.mergeable = self.act is None
        self.bank_key = f"denselora_r{rank}_{ctx.module_type()}"
        self.use_bank(ctx, self.bank_key, lambda: SharedPair(rank, in_features, out_features))
        self.M = nn.Parameter(torch.empty(rank, rank))
        self.up_params = (f"_bank_{self.bank_key}.B",)  # LoRA+: the shared decoder is the up side
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_choice("denselora_activation", opts["denselora_activation"], ACTIVATIONS)

    @classmethod
    def max_rank(cls, in_features, out_features):
        return sys.maxsize

    @property
    def bank(self) -> SharedPair:
        return getattr(self, f"_bank_{self.bank_key}")

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.M, a=math.sqrt(5))

    def forward(self, x, y, weight, mask=None):
        bank = self.bank
        h = F.linear(x, bank.A)
        if self.act is None:  # s·B M A x: s on the (tokens x r) activations
            return y + F.linear(F.linear(self.rank_masked(h, mask), self.M) * self.scale, bank.B)
        h = F.linear(self.rank_masked(self.act(h), mask), self.M)
        return torch.add(y, GeluDecode.apply(h, bank.B), alpha=self.scale)

    def delta_weight(self, weight):
        if self.act is not None:
            raise NotMergeableError(
                f"denselora with denselora_activation={self.activation!r} has no weight update: its output "
                f"is nonlinear in x; use denselora_activation='identity' (study Eq. 33) to merge")
        bank = self.bank
        return (bank.B @ self.M @ bank.A) * self.scale
