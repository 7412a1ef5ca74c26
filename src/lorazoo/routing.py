"""Token routers shared by the mixture-of-experts forms (study Eq. 124-126; HydraLoRA, LoRAMoE, GOAT).

A :class:`Router` holds the gate weights W_g (E, in) and maps each token x to gates ω(x) over E
experts: the softmax g(x) = softmax(W_g x) over all experts (dense), or its top-k entries (Eq. 125),
renormalized to sum to one (Mixtral's and GOAT's routing; equal to a softmax over the k largest
logits). The softmax, the top-k choice and the renormalization run in at least float32.

Each forward records what the auxiliary losses and the logging need (:class:`Routing`: the full
softmax, the applied gates, the top-k membership). The losses below read the record of the last
training forward, so a form's ``aux_loss()`` (summed by ``handle.aux_loss()``) can add them:

* :func:`switch_loss` - the standard load-balancing loss (study Eq. 126; Switch Transformer, GOAT's
  code): E·Σ_i f_i·P_i, f_i the fraction of tokens whose top-k holds expert i, P_i the mean softmax
  probability of expert i. Its gradient reaches the router through P.
* :func:`localized_balance_loss` - LoRAMoE's localized balancing constraint (study Eq. 128-129).

:func:`router_stats` gives, per adapted layer, each expert's mean gate, mean probability and load
(its share of the routing slots) over the last forward, for logging.

Helpers that apply gates to rank activations without a loop over experts: :func:`gate_experts`
(each expert owns r rank units of one concatenated A; LoRAMoE, GOAT) and :func:`spread` (experts
share one A; HydraLoRA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing runs in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class Routing:
    """One forward's routing, all (..., E) with the input's leading dimensions, in the work dtype."""

    probs: torch.Tensor                 # g(x) = softmax(W_g x) over all experts
    gates: torch.Tensor                 # ω(x): the gates applied to the experts
    selected: torch.Tensor | None       # bool top-k membership; None when every expert is used
    top_k: int
    training: bool                      # made in training mode with autograd on: losses may use it

    @property
    def experts(self) -> int:
        return self.probs.shape[-1]

    def chosen(self) -> torch.Tensor:
        """Top-k membership as (tokens, E) floats (all ones when dense)."""
        p = self.probs.reshape(-1, self.experts)
        if self.selected is None:
            return torch.ones_like(p)
        return self.selected.reshape(-1, self.experts).to(p.dtype)


class Router(nn.Module):
    """ω(x) over ``experts`` experts from gate weights W_g (experts, in_features).

    ``top_k`` None (or >= experts): the dense softmax. Otherwise the k largest softmax entries per
    token (Eq. 125), divided by their sum when ``renormalize`` (the default), else kept as they are
    (Eq. 125 as the study writes it). W_g starts Kaiming-uniform as nn.Linear's weight (the
    authors' code of HydraLoRA, LoRAMoE and GOAT all use an nn.Linear router without bias).
    """

    def __init__(self, in_features: int, experts: int, top_k: int | None = None, renormalize: bool = True):
        super().__init__()
        self.experts = int(experts)
        self.top_k = self.experts if top_k is None else min(int(top_k), self.experts)
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(self.experts, in_features))
        self.last: Routing | None = None
        self.reset_parameters()

    @property
    def dense(self) -> bool:
        return self.top_k >= self.experts

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(F.linear(x, self.weight))

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """Gates from precomputed logits W_g x (a form may compute them in the same matmul as its
        A x, reading x once), in the logits' dtype."""
        probs = F.softmax(logits, dim=-1, dtype=work_dtype(logits.dtype))
        if self.dense:
            gates, selected = probs, None
        else:
            idx = probs.topk(self.top_k, dim=-1).indices
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
            gates = probs.masked_fill(~selected, 0.0)
            if self.renormalize:
                gates = gates / gates.sum(-1, keepdim=True)
        self.last = Routing(probs, gates, selected, self.top_k, self.training and torch.is_grad_enabled())
        return gates.to(logits.dtype)

    def training_routing(self) -> Routing | None:
        """The record of the last forward if it was a training one (for auxiliary losses)."""
        r = self.last
        return r if r is not None and r.training else None

    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor] | None:
        """Per-expert means over the tokens of the last forward: ``gate`` (applied ω), ``prob``
        (softmax g), ``load`` (share of the token x top-k routing slots; sums to 1)."""
        r = self.last
        if r is None:
            return None
        E = r.experts
        return {"gate": r.gates.detach().reshape(-1, E).mean(0),
                "prob": r.probs.detach().reshape(-1, E).mean(0),
                "load": r.chosen().mean(0) / r.top_k}

    def __getstate__(self):  # copy/pickle without the last forward's autograd graph
        state = self.__dict__.copy()
        state["last"] = None
        return state

    def extra_repr(self) -> str:
        k = "dense" if self.dense else f"top_k={self.top_k}, renormalize={self.renormalize}"
        return f"in_features={self.weight.shape[1]}, experts={self.experts}, {k}"


# --- applying gates to rank activations ----------------------------------------------------------
def gate_experts(h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(..., E·r) activations of E experts with r units each (expert i owns units i·r..i·r+r-1),
    each scaled by its gate ω_i: one broadcast multiply, no loop over experts."""
    E = gates.shape[-1]
    if h.shape[-1] == E:
        return h * gates
    return (h.unflatten(-1, (E, h.shape[-1] // E)) * gates.unsqueeze(-1)).flatten(-2)


def spread(h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(..., E·r): the shared activations h (..., r) once per expert, scaled by ω_i, so that
    [B_1 … B_E] applied to it is Σ_i ω_i B_i h (HydraLoRA)."""
    return (gates.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)


# --- auxiliary losses ------------------------------------------------------------------------------
def switch_loss(r: Routing) -> torch.Tensor:
    """Study Eq. 126: E·Σ_i f_i·P_i, f_i = (1/|B|) Σ_x 1[i ∈ TopK(g(x))], P_i = (1/|B|) Σ_x g_i(x),
    over every token of the last forward. Uniform routing gives k; f carries no gradient."""
    p = r.probs.reshape(-1, r.experts)
    return r.experts * (r.chosen().mean(0) * p.mean(0)).sum()


def cv_squared(z: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation σ²(z)/(μ(z)² + eps) of all entries (unbiased variance, as
    LoRAMoE's code); 0 for a single entry."""
    z = z.reshape(-1)
    if z.numel() < 2:
        return z.sum() * 0
    return z.var() / (z.mean() ** 2 + eps)


def importance(gates: torch.Tensor) -> torch.Tensor:
    """LoRAMoE's importance matrix Q as (samples, E): each sample's gates summed over its tokens.
    A (..., T, E) tensor has samples ... and T tokens each; a 2-D (N, E) one has N one-token samples."""
    E = gates.shape[-1]
    q = gates.sum(-2) if gates.dim() >= 3 else gates
    return q.reshape(-1, E)


def type_coefficients(types: torch.Tensor, experts: int, delta: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LoRAMoE's coefficient matrix I (samples, E) as its code builds it: for a sample of type 1
    the first ⌊E/2⌋ experts get 1+δ and the others 1-δ; for a sample of type 0 the reverse."""
    half = experts // 2
    one = (types.reshape(-1, 1) == 1)
    up = torch.cat([one.expand(-1, half), (~one).expand(-1, experts - half)], dim=1)
    hi, lo = (torch.tensor(v, dtype=dtype, device=types.device) for v in (1.0 + delta, 1.0 - delta))
    return torch.where(up, hi, lo)


def localized_balance_loss(gates: torch.Tensor, types: torch.Tensor, delta: float) -> torch.Tensor:
    """Study Eq. 128-129 as LoRAMoE's code computes it: cv²(Z), Z = I ∘ Q (see :func:`importance`,
    :func:`type_coefficients`, :func:`cv_squared`)."""
    q = importance(gates)
    coeff = type_coefficients(types.to(q.device), q.shape[-1], delta, q.dtype)
    return cv_squared(q * coeff)


# --- logging ---------------------------------------------------------------------------------------
def router_stats(handle) -> dict[str, dict[str, torch.Tensor]]:
    """Per adapted layer (by path), each router's per-expert ``gate``, ``prob`` and ``load`` over the
    layer's last forward (see :meth:`Router.stats`); layers not run yet are left out. A form with
    several routers has one entry per router, keyed ``<path>.<router name>``."""
    out = {}
    for path, ad in handle.adapters().items():
        routers = [(n, m) for n, m in ad.form.named_modules() if isinstance(m, Router)]
        for name, router in routers:
            s = router.stats()
            if s is not None:
                out[path if len(routers) == 1 else f"{path}.{name}"] = s
    return out
