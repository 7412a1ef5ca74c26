"""Token routers shared by the mixture-of-experts forms (study Eq. 124-131; HydraLoRA, LoRAMoE, GOAT,
MoELoRA, SiRA, AdaMoLE, MoLA, LLaVA-MoLE, MLoRE, MoA, MTLoRA, MokA).

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
* :func:`expert_contrastive_loss` - MoELoRA's contrastive loss between experts' outputs (Eq. 127).
* :func:`cv_squared` of the mean gates - MLoRE's balancing loss.

:func:`router_stats` gives, per adapted layer, each expert's mean gate, mean probability and load
(its share of the routing slots) over the last forward, for logging.

Helpers that apply gates to rank activations without a loop over experts: :func:`gate_experts`
(each expert owns r rank units of one concatenated A; LoRAMoE, GOAT), :func:`gate_units` (experts
of different ranks; MLoRE) and :func:`spread` (experts share one A; HydraLoRA).

Routing by labels that come with the data (MoA's domains, MTLoRA's tasks, MokA's per-token
modalities): :func:`set_labels`, :func:`labels_context` and :func:`read_labels_from_batches` (a
forward pre-hook that takes them from a batch key and removes it, so ``model(**batch)`` and
lorazoo's Trainer pass them unchanged); each form wraps them (``moa.set_domains``, ...).

Router options beyond the softmax / top-k rule (all off by default), each a general MoE mechanism:

* ``capacity_factor`` (SiRA, GShard): in training, expert i takes at most C = ⌈c·k·T/E⌉ of the
  T tokens of a forward, in token order; the later (token, expert) slots are dropped (gate 0, the
  other gates of the token unchanged, as GShard). ``Routing.kept`` records what was kept.
* ``gate_dropout`` (SiRA's expert dropout): in training, dropout with rate p on the applied gates
  (inverted: kept gates scaled by 1/(1-p)); off in eval.
* ``noisy`` (MLoRE): E more logit rows σ(x); training adds N(0, 1)·σ(x) to the logits before the
  softmax (noisy top-k gating with the noise scale used as the router outputs it, as MLoRE's code).
* ``threshold`` (AdaMoLE, study Eq. 130-131): adaptive routing, τ(x) = τ_max·σ(w_τ·x + b_τ) from
  one more logit row; expert i is used when g_i(x) >= τ(x), with gate (g_i - τ) renormalized over
  the used experts (AdaMoLE's code). ``Routing.scores`` holds g - τ, which its balancing loss reads.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LorazooError


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
    kept: torch.Tensor | None = None    # bool slots kept under an expert capacity (None: no capacity)
    scores: torch.Tensor | None = None  # what the balancing loss averages instead of probs (AdaMoLE: g - τ)

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

    def __init__(self, in_features: int, experts: int, top_k: int | None = None, renormalize: bool = True,
                 *, capacity_factor: float | None = None, gate_dropout: float = 0.0,
                 threshold: float | None = None, noisy: bool = False):
        super().__init__()
        self.experts = int(experts)
        self.top_k = self.experts if top_k is None else min(int(top_k), self.experts)
        self.renormalize = renormalize
        if capacity_factor is not None and (threshold is not None or self.top_k >= self.experts):
            raise ValueError("an expert capacity needs top-k routing with k < experts")
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.gate_dropout = float(gate_dropout)
        self.threshold = None if threshold is None else float(threshold)  # τ_max
        self.noisy = bool(noisy)
        if self.noisy and self.threshold is not None:
            raise ValueError("a noisy router has no threshold")
        self.weight = nn.Parameter(torch.empty(self.experts, in_features))
        if self.noisy:  # the noise scale's rows: σ(x) = W_σ x (MLoRE's router outputs both)
            self.noise_weight = nn.Parameter(torch.empty(self.experts, in_features))
        if self.threshold is not None:  # AdaMoLE's threshold network nn.Linear(in, 1), with bias
            self.threshold_weight = nn.Parameter(torch.empty(1, in_features))
            self.threshold_bias = nn.Parameter(torch.empty(1))
        self.last: Routing | None = None
        self.reset_parameters()

    @property
    def dense(self) -> bool:
        return self.top_k >= self.experts and self.threshold is None

    @property
    def logit_weight(self) -> torch.Tensor:
        """The rows whose products with x :meth:`route` reads: W_g, then w_τ when adaptive."""
        if self.noisy:
            return torch.cat([self.weight, self.noise_weight])
        return self.weight if self.threshold is None else torch.cat([self.weight, self.threshold_weight])

    @property
    def width(self) -> int:
        """Number of logit columns :meth:`route` reads (rows of :attr:`logit_weight`)."""
        return self.experts * (1 + self.noisy) + (self.threshold is not None)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.noisy:
            nn.init.kaiming_uniform_(self.noise_weight, a=math.sqrt(5))
        if self.threshold is not None:  # nn.Linear's default init
            nn.init.kaiming_uniform_(self.threshold_weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(self.threshold_weight.shape[1])
            nn.init.uniform_(self.threshold_bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(F.linear(x, self.logit_weight))

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """Gates from precomputed logits W_g x (a form may compute them in the same matmul as its
        A x, reading x once; ``width`` columns, see :attr:`logit_weight`), in the logits' dtype."""
        dtype = work_dtype(logits.dtype)
        scores = kept = None
        if self.threshold is not None:
            logits, t = logits.split([self.experts, 1], dim=-1)
        if self.noisy:  # training adds N(0, 1)·σ(x) to the logits (MLoRE's code: σ used as it comes)
            logits, sigma = logits.split([self.experts, self.experts], dim=-1)
            if self.training:
                logits = logits.to(dtype) + torch.randn_like(sigma, dtype=dtype) * sigma.to(dtype)
        probs = F.softmax(logits, dim=-1, dtype=dtype)
        if self.threshold is not None:  # Eq. 130-131 as AdaMoLE's code: (g - τ)·1[g >= τ], renormalized
            tau = self.threshold * torch.sigmoid(t.to(dtype) + self.threshold_bias.to(dtype))
            scores = probs - tau
            selected = scores >= 0
            gates = scores * selected
            total = gates.sum(-1, keepdim=True)
            gates = gates / torch.where(total == 0, torch.ones_like(total), total)
        elif self.dense:
            gates, selected = probs, None
        else:
            idx = probs.topk(self.top_k, dim=-1).indices
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
            gates = probs.masked_fill(~selected, 0.0)
            if self.renormalize:
                gates = gates / gates.sum(-1, keepdim=True)
        if self.training and self.capacity_factor is not None:
            kept = within_capacity(selected, self.capacity(selected[..., 0].numel()))
            gates = gates * kept
        if self.training and self.gate_dropout > 0:
            gates = F.dropout(gates, self.gate_dropout)
        self.last = Routing(probs, gates, selected, self.top_k, self.training and torch.is_grad_enabled(),
                            kept, scores)
        return gates.to(logits.dtype)

    def capacity(self, tokens: int) -> int:
        """C = ⌈c·k·T/E⌉ slots per expert for a forward of T tokens (GShard's capacity)."""
        return math.ceil(self.capacity_factor * self.top_k * tokens / self.experts)

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
        chosen = r.chosen()
        out = {"gate": r.gates.detach().reshape(-1, E).mean(0),
               "prob": r.probs.detach().reshape(-1, E).mean(0),
               "load": chosen.sum(0) / chosen.sum()}  # = chosen.mean(0)/k with k experts a token
        if r.kept is not None:  # share of each expert's routed slots dropped by its capacity
            n = chosen.sum(0)
            out["dropped"] = (n - r.kept.reshape(-1, E).to(n.dtype).sum(0)) / n.clamp(min=1)
        return out

    def __getstate__(self):  # copy/pickle without the last forward's autograd graph
        state = self.__dict__.copy()
        state["last"] = None
        return state

    def extra_repr(self) -> str:
        if self.threshold is not None:
            k = f"threshold={self.threshold}"
        else:
            k = "dense" if self.dense else f"top_k={self.top_k}, renormalize={self.renormalize}"
        if self.capacity_factor is not None:
            k += f", capacity_factor={self.capacity_factor}"
        if self.gate_dropout:
            k += f", gate_dropout={self.gate_dropout}"
        if self.noisy:
            k += ", noisy"
        return f"in_features={self.weight.shape[1]}, experts={self.experts}, {k}"


def within_capacity(selected: torch.Tensor, capacity: int) -> torch.Tensor:
    """Bool (..., E): the slots of ``selected`` kept when each expert takes at most ``capacity``
    tokens, first come first served over the flattened tokens (GShard's order)."""
    E = selected.shape[-1]
    flat = selected.reshape(-1, E)
    position = flat.to(torch.int64).cumsum(0)  # 1-based rank of a token among the expert's tokens
    return (flat & (position <= capacity)).reshape(selected.shape)


# --- applying gates to rank activations ----------------------------------------------------------
def gate_experts(h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(..., E·r) activations of E experts with r units each (expert i owns units i·r..i·r+r-1),
    each scaled by its gate ω_i: one broadcast multiply, no loop over experts."""
    E = gates.shape[-1]
    if h.shape[-1] == E:
        return h * gates
    return (h.unflatten(-1, (E, h.shape[-1] // E)) * gates.unsqueeze(-1)).flatten(-2)


def gate_units(h: torch.Tensor, gates: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """(..., Σ r_i) activations of experts of different ranks r_i (``ranks``, a long tensor; expert i
    owns the next r_i units), each scaled by its gate: one broadcast multiply (MLoRE)."""
    return h * gates.repeat_interleave(ranks.to(gates.device), dim=-1)


def spread(h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(..., E·r): the shared activations h (..., r) once per expert, scaled by ω_i, so that
    [B_1 … B_E] applied to it is Σ_i ω_i B_i h (HydraLoRA)."""
    return (gates.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)


# --- auxiliary losses ------------------------------------------------------------------------------
def switch_loss(r: Routing) -> torch.Tensor:
    """Study Eq. 126: E·Σ_i f_i·P_i, f_i = (1/|B|) Σ_x 1[i ∈ TopK(g(x))], P_i = (1/|B|) Σ_x g_i(x),
    over every token of the last forward. Uniform routing gives k; f carries no gradient.
    With an adaptive threshold, P_i averages g_i - τ and f_i counts g_i >= τ (AdaMoLE's code)."""
    p = (r.probs if r.scores is None else r.scores).reshape(-1, r.experts)
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


def expert_contrastive_loss(h: torch.Tensor, selected: torch.Tensor, B: torch.Tensor,
                            tau: float) -> torch.Tensor:
    """MoELoRA's expert contrastive loss (study Eq. 127), mean over its (query, positive) pairs.

    ``h`` (N, E·r): the experts' rank activations A_i x of N tokens (expert i owns units
    i·r..i·r+r-1 of the concatenated A); ``selected`` (N, E) bool: which experts each token was
    routed to; ``B`` (out, E·r): the experts' up-projections side by side. Every routed
    (token, expert) slot p gives the output o_p = B_i A_i x (before gate and scale); for each
    ordered pair (q, k+) of distinct slots of the same expert, with k- the slots of other experts,
    the term is -log(exp(q·k+/τ) / (exp(q·k+/τ) + Σ_{k-} exp(q·k-/τ))), raw dot products as
    Eq. 127 prints them. The P x P products come from the Gram matrix BᵀB (E·r x E·r), never from
    the (P, out) outputs: o_p·o_q = h_pᵀ (BᵀB) h_q. Zero when no pair or no negative exists.
    """
    E = selected.shape[-1]
    tok, exp = selected.reshape(-1, E).nonzero(as_tuple=True)
    dtype = work_dtype(h.dtype)
    if tok.numel() < 2 or not bool((exp != exp[0]).any()):
        return (h.sum() + B.sum()).to(dtype) * 0
    H = gate_experts(h.reshape(-1, h.shape[-1])[tok].to(dtype), F.one_hot(exp, E).to(dtype))  # (P, E·r)
    Bw = B.to(dtype)
    S = (H @ (Bw.T @ Bw)) @ H.T / tau                   # S[p, q] = o_p·o_q / τ
    same = exp[:, None] == exp[None, :]
    negatives = S.masked_fill(same, float("-inf")).logsumexp(-1, keepdim=True)
    positive = same & ~torch.eye(len(exp), dtype=torch.bool, device=exp.device)
    pairs = positive.sum()
    if not bool(pairs):
        return S.sum() * 0
    # -log(e^S / (e^S + e^neg)) = softplus(neg - S); masked sum (cheaper than indexing in backward)
    return (F.softplus(negatives - S) * positive).sum() / pairs


# --- per-sample labels (MoA's domains, MTLoRA's tasks) -------------------------------------------
# A form routed by labels that come with the data declares ``label_kind`` ("domain", "task"),
# ``label_classes`` (how many) and keeps the labels of the next forwards in ``sample_labels``.
def labelled_forms(handle, form_cls) -> list:
    forms = [ad.form for ad in handle.adapters().values() if isinstance(ad.form, form_cls)]
    if not forms:
        raise LorazooError(f"adapter {handle.name!r} has no '{form_cls.part_name}' layer to give labels to")
    return forms


def set_labels(handle, form_cls, labels) -> None:
    """Per-sample labels (ints in 0 .. label_classes-1; one per row of an (N, in) input, per sequence
    of a (batch, seq, in) one) for the next forwards of ``form_cls`` layers; None clears them."""
    forms = labelled_forms(handle, form_cls)
    t = None
    if labels is not None:
        t = torch.as_tensor(labels).reshape(-1)
        n, kind = forms[0].label_classes, forms[0].label_kind
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or (
                t.numel() and (int(t.min()) < 0 or int(t.max()) >= n)):
            raise LorazooError(f"{kind} labels must be integers in 0..{n - 1}, got {t.tolist()[:8]}")
        t = t.long()
    for f in forms:
        f.sample_labels = t


@contextlib.contextmanager
def labels_context(handle, form_cls, labels):
    """The labels hold inside the ``with`` block only."""
    set_labels(handle, form_cls, labels)
    try:
        yield
    finally:
        set_labels(handle, form_cls, None)


def read_labels_from_batches(handle, form_cls, key: str):
    """Make ``model(**batch)`` (lorazoo's Trainer, evaluation) take the labels from ``batch[key]``,
    removed before the model's own forward sees the batch; a batch without the key clears them.
    Returns the hook's handle (``.remove()`` undoes it)."""
    labelled_forms(handle, form_cls)

    def hook(module, args, kwargs):
        set_labels(handle, form_cls, kwargs.pop(key, None))
        return args, kwargs

    return handle.model.register_forward_pre_hook(hook, with_kwargs=True)


def checked_labels(form, n: int, device) -> torch.Tensor | None:
    """The form's labels for a forward of ``n`` samples (None if none were given)."""
    t = form.sample_labels
    if t is None:
        return None
    if t.numel() != n:
        raise LorazooError(f"{t.numel()} {form.label_kind} labels were given, but the forward has {n} samples; "
                           f"give one label per sample of each batch")
    return t.to(device)
