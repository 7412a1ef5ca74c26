"""HydraLoRA (Tian et al. 2024 [91]; study Eq. 133): one shared A, routed B experts.

y = W0 x + s·(Σ_i ω_i(x) B_i) A x, ω(x) = softmax(W_g x), per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import Form, check_number
from ..registry import FORMS
from ..routing import Router, spread


@FORMS.register("hydralora", paper="HydraLoRA (Tian et al., 2024) [91]",
                equations="study Eq. 133; y = W0 x + s·(Σ_i ω_i(x) B_i) A x, ω = softmax(W_g x)",
                summary="asymmetric mixture: shared A, `experts` routed B heads, token-level softmax router")
class HydraLoRA(Form):
    """Shared A (r, in), experts B_1..B_k stored side by side as B (out, k·r), router W_g (k, in).

    All experts run in one matmul: with h = M ⊙ A x (T, r) and ω = softmax(W_g x) (T, k), the
    update is s·B·vec_i(ω_i h) where vec_i(ω_i h) is (T, k·r), since Σ_i ω_i B_i h = [B_1 … B_k]
    [ω_1 h; …; ω_k h]; A x and W_g x come from one matmul (x read once). Cost per token:
    r·in + k·in + k·r·out, never out x in.

    Init as the authors' code: A and W_g Kaiming-uniform (nn.Linear's default), every B_i zero, so
    the update starts at zero. The router (routing.Router, dense softmax, at least float32; its
    weight is ``gate.weight``, also reachable as ``router``) reads the same (dropped-out) input as
    A; the authors' code feeds it the input before dropout. No auxiliary loss (the paper has none);
    ``routing.router_stats`` logs its gates. Not mergeable: the mixture of B_i depends on the token.
    """

    mergeable = False
    options = {"experts": 4}  # the authors' fine-tuning script uses lora_b_nums=4

    @classmethod
    def validate(cls, opts):
        check_number("experts", opts["experts"], minimum=1, integer=True)
        if opts["experts"] > 256:
            raise SpecError(f"experts must be <= 256 (one B head each), got {opts['experts']!r}")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.experts = int(opts["experts"])
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, self.experts * rank))
        self._reset_factors()
        self.gate = Router(in_features, self.experts)  # drawn after A, as before the shared router

    def _reset_factors(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def reset_parameters(self) -> None:
        self._reset_factors()
        self.gate.reset_parameters()

    @property
    def router(self) -> nn.Parameter:
        """W_g (k, in), the router's weight."""
        return self.gate.weight

    def expert(self, i: int) -> torch.Tensor:
        """B_i (out, r), a view of the concatenated experts."""
        return self.B[:, i * self.rank:(i + 1) * self.rank]

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """ω(x) = softmax(W_g x) over the experts, (..., k)."""
        return self.gate(x)

    def forward(self, x, y, weight, mask=None):
        # A x and the router logits W_g x in one matmul: x is read once (forward and backward)
        h, logits = F.linear(x, torch.cat([self.A, self.gate.weight])).split([self.rank, self.experts], -1)
        mixed = spread(self.rank_masked(h, mask), self.gate.route(logits))  # (..., k·r): ω_i h for each i
        return y + F.linear(mixed * self.scale, self.B)
