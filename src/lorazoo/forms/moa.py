"""MoA, Mixture-of-LoRAs (Feng et al. 2024 [87]; study Sec. II-E2): one LoRA expert per domain,
routed per sequence, the routers supervised by the sequences' domain labels.

y = W0 x + s·B_d A_d x for every token of a sequence routed to expert d (E = ``experts`` domains).
Each adapted layer has its own router (lorazoo.routing.Router, top-1) reading the sequence: its
logits are W_g applied to the mean of the sequence's tokens (the mean of W_g x over the tokens,
computed in the same matmul as A x), so all tokens of a sequence go to one expert.

* Training: each sequence uses the expert of its ground-truth domain (the labels route the data,
  "precise, consistent data-to-expert assignments across all layer-wise routers"), and each
  router learns to predict that domain: ``moa_router_weight`` x the cross-entropy of the router's
  sequence logits against the labels, per layer, summed over layers by ``handle.aux_loss()``
  (the study's "regularization loss to penalize deviations from ground-truth domain labels").
* Inference: the router's top-1 expert per sequence (gate 1), no labels needed.

Domain labels come with the batch: :func:`set_domains` gives those of the next forwards (one per
sample: per row of a (batch, seq, in) input, per row of an (N, in) input); the :func:`domains`
context does it for one block; :func:`read_domains_from_batches` registers a hook on the model
that takes them from a batch key (``"domains"`` by default) and removes the key before the model
sees the batch, so ``model(**batch)`` — lorazoo's Trainer — passes them with no other change.
A training forward without labels raises LorazooError naming these three ways (MoA's routing is
supervised: without labels it would silently train unsupervised routers); with
``moa_require_domains=False`` it warns once instead and trains on the routers' own top-1 choices.

Choices: the study names the method without equations and we could not read the paper's code
here; the expert init is LoRA's (starts as the base), the mean over tokens includes padding (the
form sees no attention mask), the router weight is 1. The routing is a one-hot gate on the
concatenated experts' units (lorazoo.routing.gate_experts), so the forward is LoRA's two matmuls
over E·r_e units, no loop over experts. Not mergeable.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..errors import LorazooError, SpecError
from ..parts import check_number
from ..registry import FORMS
from ..routing import (checked_labels, gate_experts, labels_context, read_labels_from_batches, set_labels,
                       work_dtype)
from .loramoe import ExpertMixture

_HOW = ("give them with lorazoo.forms.moa.set_domains(handle, labels) or the domains(handle, labels) "
        "context before the forward, or read_domains_from_batches(handle) to take them from each batch's "
        "'domains' key")


@FORMS.register("moa", paper="Mixture-of-LoRAs (Feng et al., 2024) [87]",
                equations="y = W0 x + s·B_d A_d x per sequence; d = its domain label in training, "
                          "argmax_i (W_g mean_t x_t)_i in inference; L = λ·CE(W_g mean_t x_t, d)",
                summary="one LoRA expert per domain, sequence-level routing supervised by domain labels")
class MoA(ExpertMixture):
    """MoA: :class:`ExpertMixture` with one expert per domain and sequence-level top-1 routing."""

    options = {"experts": 8, "moa_router_weight": 1.0, "moa_require_domains": True}
    label_kind = "domain"

    @property
    def label_classes(self) -> int:
        return self.experts

    @classmethod
    def validate(cls, opts):
        super(ExpertMixture, cls).validate(opts)
        check_number("experts", opts["experts"], minimum=2, integer=True, maximum=256)
        check_number("moa_router_weight", opts["moa_router_weight"])
        if not isinstance(opts["moa_require_domains"], bool):
            raise SpecError(f"moa_require_domains must be True or False, got {opts['moa_require_domains']!r}")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, {**opts, "top_k": 1}, ctx)
        self.router_weight = float(opts["moa_router_weight"])
        self.require_domains = bool(opts["moa_require_domains"])
        self._warned = False
        self.sample_labels: torch.Tensor | None = None  # this batch's domains (routing.set_labels)
        self._router_loss: torch.Tensor | None = None

    def forward(self, x, y, weight, mask=None):
        h, logits = F.linear(x, torch.cat([self.A, self.gate.weight])).split([self.rank, self.experts], -1)
        seq = logits.mean(-2) if x.dim() >= 3 else logits  # (samples, E): W_g·mean_t(x_t)
        gates = self.gate.route(seq)                         # the router's top-1, gate 1
        self._router_loss = None
        labels = self._labels(seq.shape[:-1].numel(), seq.device) if self.training else None
        if labels is not None:
            gates = F.one_hot(labels, self.experts).to(h.dtype).reshape(gates.shape)
            if torch.is_grad_enabled() and self.router_weight > 0:
                self._router_loss = F.cross_entropy(seq.reshape(-1, self.experts).to(work_dtype(seq.dtype)), labels)
        if x.dim() >= 3:
            gates = gates.unsqueeze(-2)  # one gate vector per sequence, for all its tokens
        return y + F.linear(gate_experts(self.rank_masked(h, mask), gates) * self.scale, self.B)

    @property
    def requires_labels(self) -> bool:
        """A training forward needs this batch's domain labels (``moa_require_domains``)."""
        return self.require_domains

    def _labels(self, n: int, device) -> torch.Tensor | None:
        labels = checked_labels(self, n, device)
        if labels is None:
            message = (f"form 'moa' trains each sequence on its domain's expert, but no domain labels were given "
                       f"for this training forward; {_HOW}")
            if self.require_domains:
                raise LorazooError(message)
            if not self._warned:
                warnings.warn(message + " (training on the routers' own top-1 choices, routers unsupervised, "
                              "as moa_require_domains=False asks)", stacklevel=2)
                self._warned = True
        return labels

    def aux_loss(self):
        if self._router_loss is None:
            return None
        return self.router_weight * self._router_loss

    def __getstate__(self):  # copy/pickle without the last forward's graph
        state = super().__getstate__()
        state["_router_loss"] = None
        return state


def set_domains(handle, labels) -> None:
    """Domain labels (ints in 0 .. experts-1, one per sample) of the next forwards; None clears them."""
    set_labels(handle, MoA, labels)


def domains(handle, labels):
    """``with domains(handle, labels): model(...)``: the labels hold inside the block only."""
    return labels_context(handle, MoA, labels)


def read_domains_from_batches(handle, key: str = "domains"):
    """Make ``model(**batch)`` take the domain labels from ``batch[key]`` (removed before the model's
    own forward sees the batch); a batch without the key clears them. Returns the hook's handle
    (``.remove()`` undoes it)."""
    return read_labels_from_batches(handle, MoA, key)
