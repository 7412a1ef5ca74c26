"""The adapted layer: the frozen base layer plus named adapters, with exact merge/unmerge."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import like
from .errors import LorazooError, NotMergeableError, TargetError
from .parts import Form
from .qbase import dequantize, is_quantized, requantize


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 style Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class Adapter(nn.Module):
    """One named adapter on one layer: a form, its rank dropout, input dropout and base shift.

    The base shift is a low-rank correction ``shift_B @ shift_A`` that inits (PiSSA's residual)
    and schedules (ReLoRA's merges) fold into the frozen base; it is saved with the adapter so a
    pristine base can be brought to the same state, and removed exactly on delete.
    """

    tied_with: tuple[str, ...] = ()  # other modules sharing the layer's weight (lorazoo.embedding)

    def __init__(self, form: Form, rank_dropout: float, dropout: float):
        super().__init__()
        self.form = form
        self.rank_dropout = rank_dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("shift_B", torch.zeros(form.out_features, 0))
        self.register_buffer("shift_A", torch.zeros(0, form.in_features))

    def rank_mask(self, device, dtype) -> torch.Tensor | None:
        """DropLoRA (Eq. 2): one Bernoulli keep-mask over the rank per forward, rescaled by 1/(1-p)."""
        if not (self.training and self.rank_dropout > 0):
            return None
        keep = 1.0 - self.rank_dropout
        mask = torch.empty(self.form.rank, device=device, dtype=dtype).bernoulli_(keep)
        return mask / keep

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        inp = self.dropout(y if self.form.multiplicative else x)
        return self.form(inp, y, weight, self.rank_mask(y.device, y.dtype))

    def fused(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x (W0 + ΔW)ᵀ in one matmul (no bias) for a dense form (forms/dense.py); None where the base
        must see another input than the update (input dropout in training) or under autocast."""
        if not self.form.fusable or (self.training and isinstance(self.dropout, nn.Dropout)) \
                or torch.is_autocast_enabled(x.device.type):
            return None
        dtype = torch.promote_types(x.dtype, weight.dtype)
        return self.form.fused(x, weight, self.rank_mask(x.device, dtype))

    @torch.no_grad()
    def shift_base(self, weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> None:
        """Add B @ A to the frozen ``weight`` (out, in) in place and record it in the base shift."""
        if self.tied_with:  # the weight is shared (tied embeddings): the shift would change those too
            raise TargetError(_tied_message("shift the base weight of", self.tied_with))
        weight.add_(like(B.to(weight) @ A.to(weight), weight))  # a sharded weight (FSDP2) adds its shard
        store = getattr(weight, "_lorazoo_store", None)  # a dequantized copy of a quantized base (lorazoo.qbase)
        if store is not None:
            store(weight)
        self.shift_B = torch.cat([self.shift_B, B.to(self.shift_B)], dim=1)
        self.shift_A = torch.cat([self.shift_A, A.to(self.shift_A)], dim=0)

    def unshift(self, x: torch.Tensor) -> torch.Tensor:
        """-(shift_B shift_A) x: what undoes the base shift in a forward pass."""
        return -F.linear(F.linear(x, self.shift_A), self.shift_B)


class AdaptedLayer(nn.Module):
    """Wraps a linear-like base layer; runs its active, unmerged adapters in order.

    Forward: y = W x; for each active adapter, y = form(x, y, W); return y + bias. Additive forms
    add s·ΔW x, multiplicative ones (LoRMA) transform y, rescaling ones (DoRA) rescale it.
    """

    tied_with: tuple[str, ...] = ()  # other modules sharing the base weight (lorazoo.embedding)
    mixed = None  # a lorazoo.mixed.MixedLayer inside mixed_batch(): per-sample adapters

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled: set[str] = set()
        self._quant = (None, None, False)
        self.quantized()

    def quantized(self) -> bool:
        """Whether the base is quantized (lorazoo.qbase), decided once per base module and weight
        object, so the forward only compares identities (torch.compile traces it without a break)."""
        base = self.base
        weight = getattr(base, "weight", None)
        if self._quant[0] is not base or self._quant[1] is not weight:
            self._quant = (base, weight, is_quantized(base))
        return self._quant[2]

    # the base layer's geometry, seen as a (out, in) linear map
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[0] if is_conv1d(self.base) else self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.nf if is_conv1d(self.base) else self.base.out_features

    def linear_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in); a view, so writes go to the base.

        On a quantized base (lorazoo.qbase) it is a new dense tensor, dequantized for this call only;
        ``store_weight`` (which ``Adapter.shift_base`` calls by itself) writes changes back."""
        if self.quantized():
            w = dequantize(self.base)
            w._lorazoo_store = self.store_weight
            return w
        w = self.base.weight
        return w.t() if is_conv1d(self.base) else w

    @torch.no_grad()
    def store_weight(self, weight: torch.Tensor) -> None:
        """Write a changed ``linear_weight()`` back: re-quantize a quantized base; a no-op otherwise
        (the weight was a view of the base)."""
        if self.quantized():
            requantize(self.base, weight)

    @torch.no_grad()
    def dequantize_base(self) -> None:
        """Replace a quantized base by an nn.Linear holding its dequantized weight (and its bias)."""
        if not is_quantized(self.base):
            return
        w = dequantize(self.base)
        old = self.base
        self.base = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
        self.base.weight.data.copy_(w)
        if old.bias is not None:
            self.base.bias.data.copy_(old.bias.to(w))
        self.base.requires_grad_(False)

    def running(self) -> tuple[list[str], list[str]]:
        """(adapters that run in the forward, in order; adapters whose base shift must be undone).

        A base shift (PiSSA's residual, ReLoRA's merges) counts only while its adapter runs or is
        merged: an inactive or disabled adapter's shift is undone on the fly.
        """
        running = [n for n in self.active if n not in self.merged and n not in self.disabled]
        shifted = [n for n, ad in self.adapters.items()
                   if ad.shift_A.shape[0] and n not in running and n not in self.merged]
        return running, shifted

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mixed is not None:  # one adapter per sample (lorazoo.mixed)
            return self.mixed(x)
        running, shifted = self.running()
        if not running and not shifted:
            return self.base(x, *args, **kwargs)
        quantized = self.quantized()
        if quantized:  # the library's own forward; the weight is dequantized only for forms that read it
            return self._quantized_forward(x, running, shifted, *args, **kwargs)
        weight = self.linear_weight()
        bias = self.base.bias
        if len(running) == 1 and not shifted:  # a dense form alone folds the base matmul into its own
            y = self.adapters[running[0]].fused(x, weight)
            if y is not None:
                return y if bias is None else y + bias
        # Additive forms only add to y, so the bias can go in with the base matmul (one fused op);
        # forms that read y (DoRA, LoRMA) need W x alone and get the bias at the end.
        late_bias = bias is not None and any(
            self.adapters[n].form.reads_output or self.adapters[n].form.multiplicative for n in running)
        y = F.linear(x, weight, None if late_bias else bias)
        for n in running:
            y = self.adapters[n](x, y, weight)
        for n in shifted:
            y = y + self.adapters[n].unshift(x)
        return y + bias if late_bias else y

    def _quantized_forward(self, x, running, shifted, *args, **kwargs):
        """forward on a quantized base: y = base(x) (the library's kernel, bias inside), then the
        adapters. Plain LoRA gets no weight; any other form gets the weight dequantized for this call,
        and autograd keeps a reference to the layer instead of that dense copy (it dequantizes again
        in backward), so training never holds a dense weight per layer."""
        bias = self.base.bias
        late_bias = bias is not None and any(
            self.adapters[n].form.reads_output or self.adapters[n].form.multiplicative for n in running)
        y = self.base(x, *args, **kwargs)
        if late_bias:
            y = y - bias.to(y.dtype)
        weight = None
        if any(not self.adapters[n].form.plain_lora for n in running):
            weight = self.linear_weight()
        x = x.to(y.dtype)
        with _redequantize_in_backward(self, weight):
            for n in running:
                y = self.adapters[n](x, y, weight)
        for n in shifted:
            y = y + self.adapters[n].unshift(x)
        return y + bias.to(y.dtype) if late_bias else y

    # --- merge / unmerge: exact up to rounding, last merged first unmerged -----------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        form = self.adapters[name].form
        if self.quantized() and name not in self.merged:
            raise NotMergeableError(
                "the base layer is quantized: merging would re-quantize W + ΔW, and the update (much smaller "
                "than a quantization step) would be mostly rounded away, so the merged model would not "
                "compute what the adapter does; keep it unmerged, or merge(dequantize=True) to get "
                "full-precision layers with the update folded in")
        if not form.mergeable:
            raise NotMergeableError(
                f"form '{form.part_name}' cannot be merged into the base weight (its update depends "
                f"on the input); keep it unmerged"
            )
        if name in self.merged:
            return
        if self.tied_with:
            raise NotMergeableError(_tied_message("merge into", self.tied_with))
        w = self.linear_weight()
        w.copy_(form.merge(w))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        if self.merged[-1] != name:
            raise LorazooError(
                f"adapter {name!r} was merged before {self.merged[-1]!r}; unmerge "
                f"{', '.join(repr(n) for n in reversed(self.merged[self.merged.index(name) + 1:]))} first"
            )
        w = self.linear_weight()
        w.copy_(self.adapters[name].form.unmerge(w))
        self.merged.pop()

    @torch.no_grad()
    def remove(self, name: str) -> None:
        """Unmerge and unshift adapter ``name`` and drop it; the base is as before it came."""
        self.unmerge(name)
        ad = self.adapters[name]
        if ad.shift_A.shape[0]:
            w = self.linear_weight()
            w.sub_(ad.shift_B.to(w) @ ad.shift_A.to(w))
            self.store_weight(w)
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]
        self.disabled.discard(name)


def _tied_message(what: str, others: tuple[str, ...]) -> str:
    return (f"cannot {what} a layer whose weight is shared with {', '.join(map(repr, others[:3]))} (tied "
            f"embeddings): it would change those modules too; keep the adapter unmerged and use an init "
            f"that does not shift the base (see lorazoo.embedding)")


class _redequantize_in_backward(torch.autograd.graph.saved_tensors_hooks):
    """While active, a tensor autograd saves that is (a view of) ``weight``, the dequantized copy of
    ``layer``'s quantized base, is saved as a reference to the layer and dequantized again when
    backward needs it, so the dense copy is freed after the forward (as QLoRA's own kernels do)."""

    def __init__(self, layer: "AdaptedLayer", weight: torch.Tensor | None):
        ptr = None if weight is None else weight.untyped_storage().data_ptr()

        def pack(t):
            if ptr is not None and t.untyped_storage().data_ptr() == ptr and not t.requires_grad:
                return (_Dequantized, layer, t.size(), t.stride(), t.storage_offset())
            return t

        def unpack(p):
            if isinstance(p, tuple) and p and p[0] is _Dequantized:
                _, lay, size, stride, offset = p
                return dequantize(lay.base).as_strided(size, stride, offset)
            return p

        super().__init__(pack, unpack)


class _Dequantized:  # marker in _redequantize_in_backward's packed tuples
    pass


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model`` (wrapping or unwrapping a layer)."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def base_weights(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The pristine (out, in) base weight of each layer: current weight minus merges and shifts."""
    out = {}
    for p, m in layers.items():
        if isinstance(m, AdaptedLayer):
            w = m.linear_weight().detach().clone()
            if m.merged:
                for n in reversed(m.merged):
                    w = m.adapters[n].form.unmerge(w)
            for ad in m.adapters.values():
                if ad.shift_A.shape[0]:
                    w = w - ad.shift_B @ ad.shift_A
            out[p] = w
        elif is_quantized(m):
            out[p] = dequantize(m)
        else:
            out[p] = m.weight if isinstance(m, nn.Linear) else (
                m.weight.reshape(m.weight.shape[0], -1) if isinstance(m, nn.Conv2d) else m.weight.t())
    return out
