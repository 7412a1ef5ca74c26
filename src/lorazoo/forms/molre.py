"""Mixture of low-rank experts of Yang et al. (MLoRE, CVPR 2024 [96]): experts of different ranks,
a sample-level noisy top-k router, and a coefficient-of-variation balancing loss.

Followed the authors' code (YuqiYang213/MLoRE, models/transformers/MLoRE.py ``MOEBlock``,
losses/loss_schemes.py) for the parts that are a low-rank update of a layer:

* experts i = 1..E of ranks r_i (``molre_ranks``; the code's ``rank_list`` is 16, 24, ..., 128,
  15 experts), y = W0 x + s·Σ_i ω_i B_i A_i x;
* the router reads the sample (the mean of its tokens; the code pools each image's features) and
  outputs E logits μ and E noise scales σ (the code's one conv with 2E outputs); in training the
  logits get N(0, 1)·σ; ω = softmax(μ + noise) with the E - k smallest set to 0 and no
  renormalization (the code's ``pre_softmax: False``, its configs' ``topk`` 9 of 15); one routing
  per sample for all its tokens;
* loss: ``molre_aux_weight`` x cv² of the per-expert mean gate over the samples of the forward
  (std/mean squared, unbiased std; the code's ``load_balancing`` weight 3e-4), per layer.

Not covered (they are parts of MLoRE's dense-prediction decoder, not of a low-rank update of a
pretrained layer): the task-specific LoRA and its mixing weight (the router's extra output), the
generic 3x3 convolution on the detached input, the BatchNorms and 1x1 convolutions around the
block, and the task-specific routers (one router here). Choices: B starts at zero (the code's
experts are a new decoder trained from scratch and start Kaiming-uniform in both factors; as a
LoRA-style update we start as the base); A Kaiming-uniform as the code; the router has no bias.

8 experts of ranks 1..8 with top-5 by default (the code's arithmetic ranks and k/E = 9/15, at the
study's 8-expert scale). The experts are stored concatenated, A (Σr_i, in) and B (out, Σr_i), and
gated per unit (lorazoo.routing.gate_units): LoRA's two matmuls over Σr_i units, no loop over
experts. ``rank`` is not used for the experts' sizes (``molre_ranks`` sets them); the scale part's
s = alpha/rank uses the spec's rank (8 in the preset, LoRA's s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import Form, check_number
from ..registry import FORMS
from ..routing import Router, cv_squared, gate_units


@FORMS.register("molre", paper="MLoRE (Yang et al., 2024) [96]",
                equations="y = W0 x + s·Σ_i ω_i B_i A_i x, experts of ranks r_i; ω = top-k of "
                          "softmax(μ(x̄) + N(0,1)·σ(x̄)) per sample; L = λ·cv²(mean ω)",
                summary="experts of different ranks, sample-level noisy top-k router, cv² load balancing")
class MoLRE(Form):
    """Experts of ranks ``molre_ranks`` side by side; a noisy top-k router per sample."""

    mergeable = False
    rank_bound = "Σ of the k largest r_i per sample"
    options = {"molre_ranks": [1, 2, 3, 4, 5, 6, 7, 8], "top_k": 5, "molre_aux_weight": 3e-4}

    @classmethod
    def validate(cls, opts):
        ranks = opts["molre_ranks"]
        if (not isinstance(ranks, (list, tuple)) or not ranks or len(ranks) > 256
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)):
            raise SpecError(f"molre_ranks must be a non-empty list of expert ranks (positive integers), got {ranks!r}")
        opts["molre_ranks"] = list(ranks)
        check_number("top_k", opts["top_k"], minimum=1, integer=True)
        if opts["top_k"] > len(ranks):
            raise SpecError(f"top_k ({opts['top_k']}) cannot exceed the number of experts ({len(ranks)} in molre_ranks)")
        check_number("molre_aux_weight", opts["molre_aux_weight"])

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        return 2**31  # the spec's rank is not used for the experts (scale only)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.ranks = list(opts["molre_ranks"])
        if max(self.ranks) > min(in_features, out_features):
            raise SpecError(f"molre_ranks has an expert of rank {max(self.ranks)}, more than min(in, out) = "
                            f"{min(in_features, out_features)} of a {in_features} -> {out_features} layer")
        self.experts = len(self.ranks)
        self.rank = sum(self.ranks)
        self.register_buffer("_ranks", torch.tensor(self.ranks, dtype=torch.long), persistent=False)
        self.A = nn.Parameter(torch.empty(self.rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, self.rank))
        self.gate = Router(in_features, self.experts, top_k=int(opts["top_k"]), renormalize=False, noisy=True)
        self.aux_weight = float(opts["molre_aux_weight"])
        self._reset_experts()

    def _reset_experts(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # per expert as the code's Conv2d(in, r_i): 1/sqrt(in)
        nn.init.zeros_(self.B)

    def reset_parameters(self) -> None:
        self._reset_experts()
        self.gate.reset_parameters()

    def expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_i, A_i): views of expert i in the concatenated factors."""
        start = sum(self.ranks[:i])
        cols = slice(start, start + self.ranks[i])
        return self.B[:, cols], self.A[cols]

    def forward(self, x, y, weight, mask=None):
        h, logits = F.linear(x, torch.cat([self.A, self.gate.logit_weight])).split([self.rank, self.gate.width], -1)
        seq = logits.mean(-2) if x.dim() >= 3 else logits  # one routing per sample: its tokens' mean
        gates = self.gate.route(seq)
        if x.dim() >= 3:
            gates = gates.unsqueeze(-2)
        h = gate_units(self.rank_masked(h, mask), gates, self._ranks)
        return y + F.linear(h * self.scale, self.B)

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None or self.aux_weight == 0:
            return None
        return self.aux_weight * cv_squared(r.gates.reshape(-1, self.experts).mean(0))
