"""MoELoRA (Luo et al. 2024 [85]; study Eq. 124-127): routed LoRA experts trained with a load-balancing
loss and an expert contrastive loss, so that experts learn distinct features.

Form: :class:`~lorazoo.forms.loramoe.ExpertMixture`, y = W0 x + s·Σ_i ω_i(x) B_i A_i x with top-k
routing (the paper: 8 experts, top-2). Auxiliary loss per layer:
``moelora_balance``·L_balance (study Eq. 126, :func:`~lorazoo.routing.switch_loss`) +
``moelora_weight``·L_contrast (study Eq. 127, :func:`~lorazoo.routing.expert_contrastive_loss`).

Choices (no official code was found; the study gives Eq. 127 only):

* The samples of Eq. 127 are the routed (token, expert) slots of a forward: q and k are expert
  outputs o = B_i A_i x (before gate and scale); k+ the outputs of the same expert on other tokens,
  k- those of the other experts. Each ordered (q, k+) pair is one term, averaged over the pairs
  (Eq. 127's sum, divided by the number of pairs so the weight does not depend on the batch size).
* Raw dot products q·k/τ as Eq. 127 prints them, with τ = ``moelora_tau`` = 1. A cosine would
  divide by ‖o‖, which is 0 at B = 0 (LoRA's start) and makes the first gradients on B ~1/‖o‖;
  with dot products the loss's gradient is 0 at init and grows with the outputs.
* At most ``moelora_tokens`` tokens a forward enter the loss (evenly spaced over the flattened
  tokens; 64 by default). The loss has a term per pair of slots, (k·T)² of them: at k = 2 and
  T = 256 its elementwise work cost as much as the rest of a 4-layer model's training step, at
  T = 64 it is 1/16 of that. The similarities come from the Gram matrix BᵀB (E·r_e x E·r_e), never
  from the (tokens, out) outputs.
* Weights 1e-2 for both terms (Switch Transformer's balancing weight; our choice for the
  contrastive one): we could not check the paper's values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..parts import check_number
from ..registry import FORMS
from ..routing import expert_contrastive_loss, gate_experts, switch_loss
from .loramoe import ExpertMixture


@FORMS.register("moelora", paper="MoELoRA (Luo et al., 2024) [85]",
                equations="study Eq. 124-127; y = W0 x + s·Σ_i ω_i(x) B_i A_i x, "
                          "L = λ_b·E·Σ f_i P_i + λ_c·(-log exp(q·k+/τ) / Σ_{k+,k-} exp(q·k/τ))",
                summary="top-k LoRA experts with load balancing and a contrastive loss between experts' outputs")
class MoELoRA(ExpertMixture):
    """MoELoRA: :class:`ExpertMixture` plus Switch balancing and the expert contrastive loss.

    The training forward keeps the rank activations A x of the sampled tokens (pre-gate, after the
    rank mask) for :meth:`aux_loss`; eval and no-grad forwards keep nothing.
    """

    options = {"experts": 8, "top_k": 2, "moelora_tau": 1.0, "moelora_weight": 1e-2,
               "moelora_balance": 1e-2, "moelora_tokens": 64}

    @classmethod
    def validate(cls, opts):
        super().validate(opts)
        check_number("moelora_tau", opts["moelora_tau"], strict=True)
        check_number("moelora_weight", opts["moelora_weight"])
        check_number("moelora_balance", opts["moelora_balance"])
        check_number("moelora_tokens", opts["moelora_tokens"], minimum=2, integer=True)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.tau = float(opts["moelora_tau"])
        self.weight_contrast = float(opts["moelora_weight"])
        self.weight_balance = float(opts["moelora_balance"])
        self.tokens = int(opts["moelora_tokens"])
        self._sample: tuple[torch.Tensor, torch.Tensor] | None = None  # (A x, top-k) of the loss's tokens

    def forward(self, x, y, weight, mask=None):
        h, logits = F.linear(x, torch.cat([self.A, self.gate.logit_weight])).split([self.rank, self.gate.width], -1)
        h = self.rank_masked(h, mask)
        gates = self.gate.route(logits)
        self._sample = None
        if self.training and torch.is_grad_enabled() and self.weight_contrast > 0:
            flat = h.reshape(-1, self.rank)
            idx = sample_tokens(flat.shape[0], self.tokens, flat.device)
            self._sample = (flat[idx], self.gate.last.chosen()[idx] > 0)
        return y + F.linear(gate_experts(h, gates) * self.scale, self.B)

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None:
            return None
        terms = []
        if self.weight_balance > 0:
            terms.append(self.weight_balance * switch_loss(r))
        if self.weight_contrast > 0 and self._sample is not None:
            h, selected = self._sample
            terms.append(self.weight_contrast * expert_contrastive_loss(h, selected, self.B, self.tau))
        return sum(terms) if terms else None

    def __getstate__(self):  # copy/pickle without the last forward's graph
        state = super().__getstate__()
        state["_sample"] = None
        return state


def sample_tokens(n: int, limit: int, device) -> torch.Tensor:
    """Indices of at most ``limit`` of ``n`` tokens, evenly spaced (all of them when n <= limit)."""
    if n <= limit:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, limit, device=device).round().long()
