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
base (each sample keeps its own adapter's shift only, as ``activate`` does). The factors of a layer's
K adapters are padded to one rank k and stacked, (K + 1, k, in) and (K + 1, out, k), the last slot
zero for the base; a batch gathers its samples' slots and runs two batched matmuls, so the cost is
one LoRA of rank k per sample whatever K. The stacks are built on the first batch and kept on the
layer until an adapter or the base changes (:class:`Stacked`), so later batches pay no setup.

Modules saved in full with an adapter (``modules_to_save``, a classifier head; the encoder a prefix is
put in) run per adapter on that adapter's samples: a loop over the K adapters of the batch, with the
per-sample arguments (an attention mask) cut to those samples.

Inference only (the model in eval mode; the factors are read once on entry, without gradients).
Forms whose update depends on the input (routed experts, nonlinear forms) or that transform the
output (LoRMA) have no per-sample weight update and are refused, as are merged adapters.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

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
    """One adapted layer's batched per-sample forward over its cached :class:`Stacked` adapters."""

    def __init__(self, layer: AdaptedLayer, slots: list[str], index: torch.Tensor):
        self.layer, self.n = layer, len(index)
        self.stack = Stacked.of(layer)
        zero = len(self.stack.names)  # the base's slot
        own = [self.stack.names.index(s) if s in self.stack.names else zero for s in slots] + [zero]
        self.index = torch.tensor(own, device=self.stack.device)[index.to(self.stack.device)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.n:
            raise LorazooError(f"mixed_batch got {self.n} adapter names but the batch at this layer has "
                               f"{x.shape[0]} samples; give one name (or None) per sample")
        st, i = self.stack, self.index
        W, bias = self.layer.linear_weight(), self.layer.base.bias
        xb = x.reshape(self.n, -1, x.shape[-1])
        y = F.linear(xb, W)
        if st.dense is not None:
            y = y + torch.einsum("bti,boi->bto", xb, st.dense[i])
        elif st.A is not None:
            y = y + _lowrank(xb, st.A, st.B, i)
        if st.gain is not None:
            y = y * st.gain[i][:, None, :]
        if st.unshift is not None:
            sA, sB = st.unshift
            y = y - F.linear(F.linear(xb, sA), sB) + _lowrank(xb, st.shift_A, st.shift_B, i)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Stacked:
    """Every adapter of one layer, stacked for per-sample serving: padded factors (S + 1, ...) with
    the last slot zero (the base), gains and base shifts. Built once and kept on the layer until an
    adapter, its tensors (tracked by their version counters) or the base weight change, so entering
    ``mixed_batch`` for each new batch costs no restacking."""

    @classmethod
    def of(cls, layer: AdaptedLayer) -> "Stacked":
        W = layer.linear_weight()
        key = (id(W), W._version, tuple((name, id(ad), tuple((id(t), t._version) for t in _tensors(ad)))
                                        for name, ad in layer.adapters.items()))
        cached = layer.__dict__.get("_mixed_stack")
        if cached is None or cached.key != key:
            cached = cls(layer, W)
            cached.key = key
            # kept as a plain attribute (not a submodule or a buffer); dense stacks are too big to keep
            layer.__dict__["_mixed_stack"] = cached if cached.dense is None else None
        return cached

    def __init__(self, layer: AdaptedLayer, W: torch.Tensor):
        servable = {n: ad for n, ad in layer.adapters.items() if _servable(ad.form)}
        self.names, self.device = list(servable), W.device
        present = list(servable.values())
        low = [ad.form.update_factors(W) for ad in present]
        self.A = self.B = self.dense = self.gain = None
        if any(f is None for f in low):  # a dense (out, in) per slot
            self.dense = torch.stack([ad.form.delta_weight(W) if f is None else f[0] @ f[1]
                                      for f, ad in zip(low, present)] + [torch.zeros_like(W)])
        elif low:
            self.B, self.A = _stack(low, W)
        gains = [ad.form.output_gain(W) for ad in present]
        if any(g is not None for g in gains):
            ones = torch.ones(W.shape[0], dtype=W.dtype, device=W.device)
            self.gain = torch.stack([ones if g is None else g for g in gains] + [ones])
        shifted = [ad for ad in present if ad.shift_A.shape[0]]
        self.unshift = None
        if shifted:
            self.unshift = (torch.cat([ad.shift_A for ad in shifted]), torch.cat([ad.shift_B for ad in shifted], 1))
            own = [(ad.shift_B, ad.shift_A) if ad.shift_A.shape[0] else None for ad in present]
            self.shift_B, self.shift_A = _stack(own, W)


def _tensors(adapter: nn.Module):
    """The adapter's parameters and buffers (read straight from each module's dicts: this runs per batch)."""
    return [t for m in adapter.modules() for d in (m._parameters, m._buffers) for t in d.values() if t is not None]


class MixedSaved:
    """A module saved in full per adapter (a head, or a prefix-tuned encoder): each adapter's copy on its own
    samples, with the per-sample arguments (tensors whose first dimension is the batch: an attention mask) cut
    to those samples and the outputs (tensors, tuples, transformers' ModelOutputs) put back in batch order."""

    def __init__(self, saved: SavedModule, slots: list[str], index: torch.Tensor):
        self.saved, self.slots, self.index = saved, slots, index

    def __call__(self, *args, **kwargs):
        n = len(self.index)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
        if first is None or first.shape[0] != n:
            got = "no tensor input" if first is None else f"{first.shape[0]} samples"
            raise LorazooError(f"mixed_batch got {n} adapter names but the batch at a saved module has {got}; "
                               f"give one name (or None) per sample")
        parts, where = [], []
        index = self.index.to(first.device)
        for k, name in enumerate([*self.slots, None]):
            rows = (index == k).nonzero().flatten()
            if not len(rows):
                continue
            mod = self.saved.copies[name] if name in self.saved.copies else self.saved.original
            parts.append(mod(*[_cut(a, rows, n) for a in args], **{key: _cut(v, rows, n) for key, v in kwargs.items()}))
            where.append(rows)
        return _gather(parts, where, n)


def _cut(value, rows: torch.Tensor, n: int):
    """``value`` at the samples ``rows`` when it is a per-sample tensor (first dimension n), else as it is."""
    return value[rows] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n else value


def _gather(parts: list, where: list[torch.Tensor], n: int):
    """The sub-batches' outputs ``parts`` (of rows ``where``) as one batch of n: tensors scattered, tuples,
    lists and mappings (ModelOutput) field by field, anything else (None) taken from the first part."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if not first.dim():
            raise LorazooError("mixed_batch: a saved module returned a scalar (a loss over its samples), which "
                               "has no per-sample rows to put back; compute the loss outside the saved module")
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise LorazooError(f"mixed_batch: the adapters' outputs at a saved module have different shapes "
                               f"{sorted(shapes)} per sample (e.g. hidden states that keep a prefix); ask the model "
                               f"for fewer outputs (output_hidden_states=False)")
        out = first.new_empty((n, *first.shape[1:]))
        for part, rows in zip(parts, where):
            out[rows] = part
        return out
    if isinstance(first, Mapping):
        fields = {key: _gather([p[key] for p in parts], where, n) for key in first}
        return type(first)(**fields)
    if isinstance(first, (tuple, list)):
        fields = [_gather([p[i] for p in parts], where, n) for i in range(len(first))]
        return type(first)(*fields) if hasattr(first, "_fields") else type(first)(fields)  # namedtuple or not
    return first


def _lowrank(xb: torch.Tensor, A: torch.Tensor, B: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Per sample b: B_{i_b} (A_{i_b} x_b), as two batched matmuls; A (S, k, in), B (S, out, k)."""
    return torch.bmm(torch.bmm(xb, A[i].transpose(1, 2)), B[i].transpose(1, 2))


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


def _servable(form: Form) -> bool:
    """Whether the form has a per-sample weight update (and at most a known output gain)."""
    gain_known = type(form).output_gain is not Form.output_gain
    return form.mergeable and not form.multiplicative and not (form.reads_output and not gain_known)


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
    wanted = set(n for n in adapter_names if n is not None)
    for path, layer in model.named_modules():  # one walk, not one per adapter
        if not isinstance(layer, AdaptedLayer):
            continue
        for name in wanted.intersection(layer.merged):
            raise LorazooError(f"adapter {name!r} is merged into the base; unmerge() it before mixed_batch")
        for name in wanted.intersection(layer.adapters):
            form = layer.adapters[name].form
            if not _servable(form):
                raise SpecError(f"adapter {name!r} cannot run per sample: form '{form.part_name}' at {path} has "
                                f"no weight update of its own (its output depends on the input or transforms the "
                                f"layer's output)")
    return list(adapter_names)
