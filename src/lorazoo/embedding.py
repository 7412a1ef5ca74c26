"""Adapters on ``nn.Embedding``: an embedding is a linear map on one-hot token vectors.

An embedding with weight E (num_embeddings, dim) computes ``E[idx]`` = ``Eᵀ onehot(idx)``, so seen
as a linear layer it maps in = num_embeddings to out = dim with the (out, in) weight ``Eᵀ``
(``linear_weight()``, a view: merges and base shifts write to E). LoRA's ΔW = s·B·A then has
A (r, num_embeddings) and B (dim, r), and its forward is a lookup of A's columns,
``s·B(M ⊙ A[:, idx])``, never a one-hot product: this is PEFT's ``lora_embedding_A`` (A) and
``lora_embedding_B`` (B), tensor for tensor. DoRA works the same way (its norm per output row of
the (dim, num_embeddings) map, i.e. per embedding dimension, PEFT's ``DoraEmbeddingLayer``).

Supported forms: LoRA (under any weight-based init: default, PiSSA, OLoRA, MiLoRA, ...) and DoRA,
the two PEFT has for embeddings. Other forms (LoHa, VeRA, mixtures, ...) would need the dense
(dim, vocab) update or a one-hot input per token, and are refused by ``adapt`` before any change;
so are data-driven inits (their statistics read layer inputs as float rows).

Choices, as PEFT's ``lora.Embedding``:
- default init A = 0, B ~ N(0, 1) (not LoRA's Kaiming A / zero B: A's fan-in is the vocabulary,
  so a Kaiming A is ~1/sqrt(vocab) and B would barely move at first); the update starts at zero.
- no input dropout on token indices (``dropout`` is ignored here); rank dropout applies.
- a subclass that scales its output (``embed_scale``, Gemma's scaled embeddings) gets the scale on
  the whole adapted output, base and update alike; other subclasses with their own ``forward``,
  and embeddings with ``max_norm`` (which renormalize the weight in place), are refused.

Tied embeddings (an output head sharing the embedding's weight, as GPT-2's and BERT's MLM
``lm_head``): the adapter changes the input embedding only, as PEFT does by default; the head
keeps computing with the frozen shared weight, so the adapted model's head output is the base
one's. Anything that would write the shared weight is refused, since it would change the head too:
``merge`` raises NotMergeableError and inits that shift the base (PiSSA, OLoRA) raise a
TargetError before the model changes. This holds for any adapted layer whose weight is shared
(a tied ``lm_head`` targeted as a Linear, too). To adapt the head as well, target it separately.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError, TargetError
from .forms.dora import DoRA
from .forms.lora import LoRA
from .layer import AdaptedLayer


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def check_embedding(path: str, module: nn.Module) -> None:
    """Raise TargetError when the embedding at ``path`` cannot take an adapter."""
    if module.max_norm is not None:
        raise TargetError(f"embedding {path!r} has max_norm={module.max_norm}: its lookup renormalizes the "
                          f"weight in place, which lorazoo cannot adapt; exclude it from targets")
    if type(module).forward is not nn.Embedding.forward and not hasattr(module, "embed_scale"):
        raise TargetError(f"embedding {path!r} ({type(module).__name__}) has its own forward; lorazoo adapts "
                          f"nn.Embedding and subclasses that only scale it (embed_scale); exclude it from targets")


def supports(form_cls) -> bool:
    """The form computes LoRA's or DoRA's forward on top of A, B factors (any init)."""
    return (issubclass(form_cls, LoRA) and form_cls.delta is LoRA.delta and form_cls.factors is LoRA.factors
            and form_cls.forward in (LoRA.forward, DoRA.forward) and not form_cls.multiplicative)


def check_spec(spec, init, layers: dict[str, nn.Module]) -> None:
    """Raise SpecError when the spec's form or init cannot run on the embedding targets."""
    embeddings = [p for p, m in layers.items() if is_embedding(getattr(m, "base", m))]
    if not embeddings:
        return
    if not supports(spec.part_classes()["form"]):
        raise SpecError(f"form '{spec.form}' cannot adapt embedding layers ({', '.join(embeddings[:3])}); "
                        f"lorazoo adapts embeddings with 'lora' and 'dora' (as PEFT); exclude them from targets")
    if init.needs_calibration:
        raise SpecError(f"init '{spec.init}' is data-driven and does not support embedding targets (its "
                        f"statistics read layer inputs as rows): {', '.join(embeddings[:3])}; use a weight-based "
                        f"or default init on embeddings")


def tied_paths(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """For each target whose weight another module also holds (tied embeddings), those modules' paths."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        w = mod._parameters.get("weight")
        if w is not None:
            holders.setdefault(id(w), []).append((path, mod))
    out = {}
    for p, m in layers.items():
        base = getattr(m, "base", m) if isinstance(m, AdaptedLayer) else m
        # another module holding the same weight; the layer itself reached by a second path (a module
        # shared across blocks, as ALBERT's) is no tie: the wrapper is seen there too
        others = tuple(h for h, mod in holders.get(id(base.weight), []) if mod is not base and mod is not m)
        if others:
            out[p] = others
    return out


def lookup(base: nn.Embedding, idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` with the base's padding index (no gradient to its row, as the base and PEFT)."""
    return F.embedding(idx, table, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, base.sparse)


class EmbeddingAdaptedLayer(AdaptedLayer):
    """An AdaptedLayer around an nn.Embedding, seen as the linear map onehot(idx) -> Eᵀ onehot(idx).

    Forward: y = E[idx]; each active adapter adds s·B(M ⊙ A[:, idx]) (LoRA) or rescales as DoRA;
    base shifts of inactive adapters are undone by a lookup in shift_A; then ``embed_scale``.
    """

    @property
    def bias(self):
        return None

    @property
    def in_features(self) -> int:
        return self.base.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base.embedding_dim

    def linear_weight(self) -> torch.Tensor:
        """Eᵀ (dim, num_embeddings); a view, so merges and shifts write to the embedding."""
        return self.base.weight.t()

    @torch.no_grad()
    def default_init(self, form) -> None:
        """PEFT's embedding init: A = 0, B ~ N(0, 1) (see the module docstring)."""
        nn.init.zeros_(form.A)
        nn.init.normal_(form.B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running, shifted = self.running()
        if not running and not shifted:
            return self.base(x, *args, **kwargs)
        base = self.base
        y = lookup(base, x, base.weight)
        weight = self.linear_weight()
        for n in running:
            ad = self.adapters[n]
            form = ad.form
            mask = ad.rank_mask(y.device, y.dtype)
            h = form.rank_masked(lookup(base, x, form.A.t()), mask) * form.scale
            y = y + F.linear(h, form.B)
            if type(form).forward is DoRA.forward:
                y = y * form.gain(form.row_norm(weight, mask))
        for n in shifted:
            ad = self.adapters[n]
            y = y - F.linear(lookup(base, x, ad.shift_A.t()), ad.shift_B)
        scale = getattr(base, "embed_scale", None)
        return y if scale is None else y * scale.to(y.dtype) if torch.is_tensor(scale) else y * scale
