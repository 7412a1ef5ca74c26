"""LoRAMoE (Dou et al. 2023 [86]; study Eq. 124-129): routed LoRA experts with a localized balancing
constraint, and :class:`ExpertMixture`, the mixture of LoRA experts GOAT builds on.

y = W0 x + s·Σ_i ω_i(x) B_i A_i x (Eq. 124), ω the router's gates (routing.Router: softmax, top-k
of Eq. 125 renormalized). Auxiliary loss (Eq. 128-129): β·cv²(Z), Z = I ∘ Q, Q the importance
matrix (each sample's gates summed over its tokens) and I the type coefficients (1 ± δ).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorazooError, SpecError
from ..parts import Form, check_number
from ..registry import FORMS
from ..routing import Router, gate_experts, localized_balance_loss


class ExpertMixture(Form):
    """E LoRA experts (B_i, A_i) of rank r_e mixed per token by a :class:`Router` (study Eq. 124).

    ``rank`` is the total rank over the experts, as in the study's comparisons ("8 experts of rank 1,
    a total rank of 8, as LoRA's") and in the study's and GOAT's code: each expert gets
    r_e = ⌈rank / experts⌉ (the study's code rounds up likewise), so rank 8 with 8 experts is eight
    rank-1 experts, and rank 4 with 8 experts also gives eight rank-1 experts (total 8). The form's
    ``rank`` (the rank mask's length) is the realized E·r_e; the scale part sees the spec's rank.

    The experts are stored concatenated, A (E·r_e, in) and B (out, E·r_e), and run as LoRA's two
    matmuls: h = M ⊙ A x (one matmul with the router's W_g x), each expert's r_e units scaled by its
    gate, then s·B h, since
    Σ_i ω_i B_i A_i x = [B_1 … B_E] [ω_1 A_1 x; …; ω_E A_E x]. Cost per token E·r_e·(in + out) + E·in,
    never out x in; top-k routing zeroes the unchosen gates rather than gathering tokens per expert
    (no loop over experts; with rank-1 experts the dense matmul is cheaper than a dispatch).
    Init as LoRA per expert (A Kaiming-uniform, B zero), so the update starts at zero. The router
    reads the (dropped-out) adapter input; the authors' code feeds it the input before dropout.
    Not mergeable: the mixture depends on the token.
    """

    mergeable = False
    rank_bound = "k·⌈r/E⌉ per token (top-k of E experts)"
    options = {"experts": 8, "top_k": 2}

    @classmethod
    def validate(cls, opts):
        super().validate(opts)
        check_number("experts", opts["experts"], minimum=1, integer=True, maximum=256)
        check_number("top_k", opts["top_k"], minimum=1, integer=True)
        if opts["top_k"] > opts["experts"]:
            raise SpecError(f"top_k ({opts['top_k']}) cannot exceed experts ({opts['experts']}); "
                            f"top_k = experts routes every token to every expert")

    @staticmethod
    def expert_rank_of(rank: int, experts: int) -> int:
        return -(-int(rank) // int(experts))

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        return int(opts["experts"]) * min(in_features, out_features)  # each expert's rank <= min(in, out)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.experts = int(opts["experts"])
        self.expert_rank = self.expert_rank_of(rank, self.experts)
        self.rank = self.experts * self.expert_rank
        self.A = nn.Parameter(torch.empty(self.rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, self.rank))
        self._reset_experts()
        self.gate = Router(in_features, self.experts, top_k=int(opts["top_k"]), **self.router_options(opts))

    @classmethod
    def router_options(cls, opts) -> dict:
        """Keyword options of this mixture's :class:`Router` beyond top-k (capacity, gate dropout,
        adaptive threshold: see lorazoo.routing); none for plain top-k routing."""
        return {}

    def _reset_experts(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # per expert as nn.Linear: bound 1/sqrt(in)
        nn.init.zeros_(self.B)

    def reset_parameters(self) -> None:
        self._reset_experts()
        self.gate.reset_parameters()

    def expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_i, A_i): views of expert i in the concatenated factors."""
        cols = slice(i * self.expert_rank, (i + 1) * self.expert_rank)
        return self.B[:, cols], self.A[cols]

    def forward(self, x, y, weight, mask=None):
        # A x and the router logits W_g x in one matmul: x is read once (forward and backward)
        h, logits = F.linear(x, torch.cat([self.A, self.gate.logit_weight])).split([self.rank, self.gate.width], -1)
        h = gate_experts(self.rank_masked(h, mask), self.gate.route(logits))  # ω_i on expert i's units
        return y + F.linear(h * self.scale, self.B)


@FORMS.register("loramoe", paper="LoRAMoE (Dou et al., 2023) [86]",
                equations="study Eq. 124-129; y = W0 x + s·Σ_i ω_i(x) B_i A_i x, "
                          "L = β·σ²(Z)/μ(Z)² with Z = I ∘ Q (localized balancing)",
                summary="router over LoRA experts; localized balancing loss splits them into two groups")
class LoRAMoE(ExpertMixture):
    """LoRAMoE: :class:`ExpertMixture` plus the localized balancing constraint (Eq. 128-129).

    Loss, as the authors' code computes it (``cv_squared`` in peft/tuners/lora.py): Q (samples, E)
    sums each sample's applied gates over its tokens (an (N, in) input is N one-token samples), I is
    1+δ or 1-δ per (sample, expert) from the sample's type, and the loss β·Var(Z)/Mean(Z)² over all
    entries of Z = I ∘ Q (unbiased variance, ε = 1e-10). Eq. 129 writes σ²(Z)/μ(Z); we keep the
    code's squared coefficient of variation, which does not grow with the number of tokens.

    Types: the code gives a type-1 sample (world-knowledge data in its data set) 1+δ on the first
    ⌊E/2⌋ experts and 1-δ on the rest, a type-0 sample (downstream-task data) the reverse. Since the
    loss is minimized, a group weighted 1+δ is pushed to carry less of that sample; so type-0 samples
    lean to the first group and type-1 samples to the second. A generic library has no such labels:
    every sample counts as type 0 (downstream task) unless :func:`set_sample_types` gives the types
    of the next forwards' samples; ``loramoe_delta=0`` makes the loss a plain importance balance.

    Defaults: δ = β = 0.1, our reading of the paper's setup (we could not check its text here; the
    repository's example script sets both to 0, which turns the constraint off); 8 experts, top-2,
    renormalized (study Sec. IV-C4 and the study's code, which softmaxes the top-k logits;
    LoRAMoE's own router is the dense softmax: ``top_k=experts``). The loss is β·cv² per adapted
    layer, summed over layers by ``handle.aux_loss()`` (the code sums it over layers likewise).
    """

    options = {"experts": 8, "top_k": 2, "loramoe_delta": 0.1, "loramoe_beta": 0.1}

    @classmethod
    def validate(cls, opts):
        super().validate(opts)
        check_number("loramoe_delta", opts["loramoe_delta"], maximum=1.0)
        check_number("loramoe_beta", opts["loramoe_beta"])
        if opts["loramoe_delta"] > 0 and opts["experts"] < 2:
            raise SpecError(f"loramoe_delta={opts['loramoe_delta']} splits the experts into two groups, which "
                            f"needs experts >= 2; raise experts or set loramoe_delta=0")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.delta = float(opts["loramoe_delta"])
        self.beta = float(opts["loramoe_beta"])
        self.sample_types: torch.Tensor | None = None

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None or self.beta == 0:
            return None
        n = _samples(r.gates)
        types = self.sample_types
        if types is None:
            types = torch.zeros(n, dtype=torch.long, device=r.gates.device)
        elif types.numel() != n:
            raise LorazooError(f"set_sample_types gave {types.numel()} sample types, but the last forward had "
                               f"{n} samples; set the types of each batch before its forward")
        return self.beta * localized_balance_loss(r.gates, types, self.delta)


def _samples(gates: torch.Tensor) -> int:
    return gates[..., 0].numel() // (gates.shape[-2] if gates.dim() >= 3 else 1)


def set_sample_types(handle, types) -> None:
    """Give LoRAMoE the types of the samples of the next forwards (1: world-knowledge data, 0:
    downstream-task data; one per sample: per row of a (batch, seq, in) input's batch, per row of an
    (N, in) input). ``None`` goes back to treating every sample as type 0."""
    forms = [ad.form for ad in handle.adapters().values() if isinstance(ad.form, LoRAMoE)]
    if not forms:
        raise LorazooError(f"adapter {handle.name!r} has no 'loramoe' layer to give sample types to")
    t = None
    if types is not None:
        t = torch.as_tensor(types).reshape(-1).long()
        if not bool(((t == 0) | (t == 1)).all()):
            raise LorazooError(f"sample types are 0 (downstream task) or 1 (world knowledge), got "
                               f"{sorted(set(t.tolist()))}")
    for f in forms:
        f.sample_types = t
