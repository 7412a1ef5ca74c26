"""Many adapters on one base, per sample: ``with lorazoo.mixed_batch(model, names): model(batch)``.

``names`` has one entry per sample of the batch (the first dimension of every adapted layer's input),
an adapter name or None for the base model. Each sample gets what it would get with only its
adapter active (``activate(model, name)``; None: no adapter), computed in one batched operation per
layer instead of a loop over sub-batches:

    y_b = (W x_b + B_{a(b)} A_{a(b)} x_b) ⊙ g_{a(b)} − Σ_k S_k x_b + S_{a(b)} x_b + bias,

where B_a A_a = ΔW_a are adapter a's update factors (:meth:`Form.update_factors`: s·B, A for LoRA
and its inits, (s·Λ_b B, Λ_d A) for VeRA, the Khatri-Rao factors of LoHa, ...; forms without low-rank
factors fall back to their dense ΔW, one gathered (out, in) matrix per sample), g_a is DoRA's row gain
(1 for the others), and S_k = shift_B shift_A the base shifts that inits such as PiSSA fold into the
base (each sample keeps its own adapter's shift only, as ``activate`` does). The factors of the K
adapters are padded to one rank k and stacked, (K + 1, k, in) and (K + 1, out, k), the last slot
zero for the base; a batch gathers its samples' slots and runs two batched matmuls, so the cost is
one LoRA of rank k per sample whatever K.

Modules saved in full with an adapter (``modules_to_save``, a classifier head) run per adapter on
that adapter's samples: a loop over the K adapters of the batch, on the small head only.

Inference only (the model in eval mode; the factors are read once on entry, without gradients).
Forms whose update depends on the input (routed experts, nonlinear forms) or that transform the
output (LoRMA) have no per-sample weight update and are refused, as are merged adapters.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LorazooError, SpecError
from .handle import handles_of
from .layer import AdaptedLayer
from .parts import Form
from .saved import SavedModule


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]):
    """Within this block, sample i of a batch runs with adapter ``adapter_names[i]`` (None: base)."""
    names = _check(model, adapter_names)
    slots = list(dict.fromkeys(n for n in names if n is not None))
    index = torch.tensor([len(slots) if n is None else slots.index(n) for n in names])
    touched = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, AdaptedLayer):
                    m.mixed = MixedLayer(m, slots, index)
                    touched.append(m)
                elif isinstance(m, SavedModule) and any(s in m.copies for s in slots):
                    m.mixed = MixedSaved(m, slots, index)
                    touched.append(m)
        yield
    finally:
        for m in touched:
            m.mixed = None


class MixedLayer:
    """One adapted layer's stacked per-adapter factors, gains and shifts, and the batched forward."""

    def __init__(self, layer: AdaptedLayer, slots: list[str], index: torch.Tensor):
        W = layer.linear_weight()
        self.layer, self.n = layer, len(index)
        self.index = index.to(W.device)
        present = [layer.adapters[s] if s in layer.adapters else None for s in slots]
        low = [None if ad is None else ad.form.update_factors(W) for ad in present]
        self.A = self.B = self.dense = self.gain = None
        if any(f is None and ad is not None for f, ad in zip(low, present)):  # a dense (out, in) per slot
            zero = torch.zeros_like(W)
            self.dense = torch.stack([zero if ad is None else ad.form.delta_weight(W) if f is None else f[0] @ f[1]
                                      for f, ad in zip(low, present)] + [zero])
        elif any(f is not None for f in low):
            self.B, self.A = _stack(low, W)
        gains = [None if ad is None else ad.form.output_gain(W) for ad in present]
        if any(g is not None for g in gains):
            ones = torch.ones(W.shape[0], dtype=W.dtype, device=W.device)
            self.gain = torch.stack([ones if g is None else g for g in gains] + [ones])
        shifted = [ad for ad in layer.adapters.values() if ad.shift_A.shape[0]]
        self.unshift = None
        if shifted:
            self.unshift = (torch.cat([ad.shift_A for ad in shifted]), torch.cat([ad.shift_B for ad in shifted], 1))
            own = [None if ad is None or not ad.shift_A.shape[0] else (ad.shift_B, ad.shift_A) for ad in present]
            self.shift_B, self.shift_A = _stack(own, W)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.n:
            raise LorazooError(f"mixed_batch got {self.n} adapter names but the batch at this layer has "
                               f"{x.shape[0]} samples; give one name (or None) per sample")
        layer = self.layer
        W, bias = layer.linear_weight(), layer.base.bias
        xb = x.reshape(self.n, -1, x.shape[-1])
        y = F.linear(xb, W)
        i = self.index
        if self.dense is not None:
            y = y + torch.einsum("bti,boi->bto", xb, self.dense[i])
        elif self.A is not None:
            y = y + _lowrank(xb, self.A[i], self.B[i])
        if self.gain is not None:
            y = y * self.gain[i][:, None, :]
        if self.unshift is not None:
            sA, sB = self.unshift
            y = y - F.linear(F.linear(xb, sA), sB) + _lowrank(xb, self.shift_A[i], self.shift_B[i])
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class MixedSaved:
    """A module saved in full per adapter (a head): each adapter's copy on its own samples."""

    def __init__(self, saved: SavedModule, slots: list[str], index: torch.Tensor):
        self.saved, self.slots, self.index = saved, slots, index

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.shape[0] != len(self.index):
            raise LorazooError(f"mixed_batch got {len(self.index)} adapter names but the batch at a saved module "
                               f"has {x.shape[0]} samples; give one name (or None) per sample")
        out = None
        index = self.index.to(x.device)
        for k, name in enumerate([*self.slots, None]):
            rows = (index == k).nonzero().flatten()
            if not len(rows):
                continue
            mod = self.saved.copies[name] if name in self.saved.copies else self.saved.original
            part = mod(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


def _lowrank(xb: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per sample b: B_b (A_b x_b), as two batched matmuls; A (n, k, in), B (n, out, k)."""
    return torch.bmm(torch.bmm(xb, A.transpose(1, 2)), B.transpose(1, 2))


def _stack(factors: list, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every slot's (B (out, r), A (r, in)) to the largest r and stack them, plus a zero slot."""
    k = max((f[1].shape[0] for f in factors if f is not None), default=0)
    out, fin = W.shape
    Bs = torch.zeros(len(factors) + 1, out, k, dtype=W.dtype, device=W.device)
    As = torch.zeros(len(factors) + 1, k, fin, dtype=W.dtype, device=W.device)
    for s, f in enumerate(factors):
        if f is not None:
            B, A = f
            Bs[s, :, :B.shape[1]] = B
            As[s, :A.shape[0]] = A
    return Bs, As


def _check(model: nn.Module, adapter_names) -> list[str | None]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise SpecError(f"adapter_names must be a list with one adapter name (or None) per sample, "
                        f"got {adapter_names!r}")
    handles = handles_of(model)
    unknown = sorted({n for n in adapter_names if n is not None and n not in handles}, key=str)
    if unknown:
        raise SpecError(f"no adapter named {', '.join(map(repr, unknown))} on this model; it has: "
                        f"{', '.join(sorted(handles)) or 'none'}")
    if model.training:
        raise LorazooError("mixed_batch is for inference: call model.eval() first (it reads each adapter's "
                           "factors once, without gradients)")
    for name in dict.fromkeys(n for n in adapter_names if n is not None):
        h = handles[name]
        if h.merged:
            raise LorazooError(f"adapter {name!r} is merged into the base; unmerge() it before mixed_batch")
        for path, ad in h.adapters().items():
            form = ad.form
            gain_known = type(form).output_gain is not Form.output_gain
            if not form.mergeable or form.multiplicative or (form.reads_output and not gain_known):
                raise SpecError(f"adapter {name!r} cannot run per sample: form '{form.part_name}' at {path} has "
                                f"no weight update of its own (its output depends on the input or transforms the "
                                f"layer's output)")
    return list(adapter_names)
