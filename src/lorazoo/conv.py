"""Adapters on 2-D convolutions: a k x k conv is a linear map on its unfolded input patches.

A Conv2d with weight W (out, in, kh, kw) and groups == 1 computes, at every output position, ``W x``
with W seen as (out, in·kh·kw) and x the (in·kh·kw) patch under the kernel (channel-major, then
kernel row, then kernel column: the order of ``F.unfold`` and of ``W.view(out, -1)``). So every
form works unchanged on conv layers: :class:`ConvAdaptedLayer` hands it the patches as rows
``x`` (N, Ho, Wo, in·kh·kw), the base output as channel-last rows ``y`` (N, Ho, Wo, out) and the
weight as the (out, in·kh·kw) view; the result goes back to (N, out, Ho, Wo). For LoRA this is
exactly conv-LoRA's ΔW = B·A with A a kh x kw conv (in -> r) and B a 1 x 1 conv (r -> out).

Cost. The base output always comes from the layer's own conv. Plain LoRA (under any init) takes
a fast path with the same numbers and no unfolding: A as a kh x kw conv (in -> r), the rank mask
on its r channels, B as a 1 x 1 conv (r -> out), all in NCHW (``ConvAdaptedLayer.fast_lora``;
input dropout then falls on pixels rather than on patch entries). Every other form gets patch
rows: free for 1 x 1 convs without padding (a strided, channel-last view of the input, which the
forms' matmuls copy once), while for k x k convs ``F.unfold`` materializes N·Ho·Wo·in·kh·kw
values (k² times the input at stride 1), fine for stems (in = 3), heavy for wide k x k layers.
Multiplicative forms (LoRMA) only read ``y`` and never unfold.

Padding: convs whose forward pads by itself (EfficientNet's "same"-padding subclasses, padding
modes other than zeros) are handled generically: the base forward runs once under a
``TorchFunctionMode`` that intercepts its ``conv2d`` call on this layer's weight and records the
exact (already padded) input, stride, padding and dilation it used. That call runs without the
bias (added after the adapters, since DoRA and LoRMA need W x alone). A forward that does more
than one conv2d with its weight, or changes the conv's output before returning it, is refused.

Not supported: grouped and depthwise convs (groups > 1; their weight is not one (out, in·k²)
map), refused by target selection with a TargetError; data-driven inits (EVA, LoRA-GA), whose
calibration pass reads layer inputs as rows, refuse conv targets with a SpecError.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import TargetError
from .layer import AdaptedLayer


def is_conv2d(module: nn.Module) -> bool:
    """A 2-D convolution (nn.Conv2d or a subclass, such as EfficientNet's same-padding convs)."""
    return isinstance(module, nn.Conv2d)


def check_conv(path: str, module: nn.Module) -> None:
    """Raise TargetError when the conv at ``path`` cannot take an adapter (grouped, depthwise)."""
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels == module.out_channels else "grouped"
        raise TargetError(
            f"layer {path!r} is a {kind} convolution (groups={module.groups}); lorazoo adapts only convs "
            f"with groups=1, whose weight is one (out, in·k·k) linear map. Exclude it from targets "
            f"('all-conv' skips such layers)")


def conv_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a conv seen as a linear map on patches: (in·kh·kw, out)."""
    w = module.weight
    return w[0].numel(), w.shape[0]


def conv_linear_weight(module: nn.Module) -> torch.Tensor:
    """The conv weight as (out, in·kh·kw); a view, so writes go to the conv."""
    w = module.weight
    try:
        return w.view(w.shape[0], -1)
    except RuntimeError:
        raise TargetError(f"the weight of conv {type(module).__name__} is not contiguous (channels_last?); "
                          f"call model.to(memory_format=torch.contiguous_format) before adapting") from None


class _ConvCall(TorchFunctionMode):
    """Intercepts the base forward's conv2d on ``weight``: runs it without bias, records its inputs."""

    _names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.call, self.output = weight, None, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.conv2d and (args[1] if len(args) > 1 else kwargs.get("weight")) is self.weight:
            if self.call is not None:
                raise TargetError("the conv layer's forward calls conv2d twice with its weight; "
                                  "lorazoo cannot adapt it")
            call = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": None}
            call.update(dict(zip(self._names, args)), **kwargs)
            self.call = call
            self.output = func(call["input"], self.weight, None, call["stride"], call["padding"],
                               call["dilation"], call["groups"])
            return self.output
        return func(*args, **kwargs)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def patch_rows(call: dict, out_hw: tuple[int, int]) -> torch.Tensor:
    """The conv's input as patch rows (N, Ho, Wo, in·kh·kw), from a recorded conv2d call."""
    x, w = call["input"], call["weight_shape"]
    kh, kw = w[2], w[3]
    stride, dilation, padding = _pair(call["stride"]), _pair(call["dilation"]), call["padding"]
    if isinstance(padding, str):  # "valid" or "same" (PyTorch puts the odd extra pixel after)
        pads = [0, 0, 0, 0]
        if padding == "same":
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pads = [tw // 2, tw - tw // 2, th // 2, th - th // 2]
        x, padding = (F.pad(x, pads) if any(pads) else x), (0, 0)
    padding = _pair(padding)
    if kh == kw == 1 and padding == (0, 0):  # a strided view, no unfold
        rows = x[:, :, ::stride[0], ::stride[1]].movedim(1, -1)
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C·k², L)
        rows = cols.transpose(1, 2).reshape(x.shape[0], out_hw[0], out_hw[1], -1)
    if rows.shape[1:3] != tuple(out_hw):
        raise TargetError(f"conv patches have spatial shape {tuple(rows.shape[1:3])} but the conv output "
                          f"has {tuple(out_hw)}; the layer's padding is not understood")
    return rows


def lora_conv_delta(adapter, call: dict) -> torch.Tensor:
    """conv-LoRA: s·B(M ⊙ A x) with A a kh x kw conv (in -> r) and B a 1 x 1 conv (r -> out), in NCHW.

    Same numbers as the patch-row path (A·patch is the k x k conv), without unfolding; input
    dropout falls on input pixels rather than on patch entries.
    """
    form, x = adapter.form, adapter.dropout(call["input"])
    A = form.A.view(form.rank, *call["weight_shape"][1:])
    h = F.conv2d(x, A, None, call["stride"], call["padding"], call["dilation"])
    mask = adapter.rank_mask(h.device, h.dtype)
    if mask is not None:
        h = h * mask.view(1, -1, 1, 1)
    return F.conv2d(h, form.B[:, :, None, None]) * form.scale


class ConvAdaptedLayer(AdaptedLayer):
    """An AdaptedLayer around a Conv2d-like layer (groups == 1); forms act on patch rows.

    Forward: y = conv(x) without bias (the layer's own conv, own padding); the active adapters
    run on rows (x as patches, y channel-last, W as (out, in·kh·kw)); then the bias is added.
    Plain LoRA takes a faster path with the same numbers (``fast_lora``; see lora_conv_delta).
    """

    fast_lora = True

    @property
    def in_features(self) -> int:
        return conv_shape(self.base)[0]

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[0]

    def linear_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in·kh·kw); a view, so merges write to the conv weight."""
        return conv_linear_weight(self.base)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running, shifted = self.running()
        if not running and not shifted:
            return self.base(x, *args, **kwargs)
        mode = _ConvCall(self.base.weight)
        with mode:
            out = self.base(x, *args, **kwargs)
        if mode.call is None or out is not mode.output:
            raise TargetError(f"{type(self.base).__name__}.forward does not return its conv2d output "
                              f"unchanged; lorazoo cannot adapt this conv layer")
        call = {**mode.call, "weight_shape": tuple(self.base.weight.shape)}
        unbatched = out.dim() == 3  # conv2d also takes (C, H, W)
        if unbatched:
            call["input"], out = call["input"].unsqueeze(0), out.unsqueeze(0)
        weight = self.linear_weight()
        y, as_rows, rows_x = out, False, None  # y stays NCHW until a form needs channel-last rows
        for n in running:
            ad = self.adapters[n]
            if self.fast_lora and ad.form.plain_lora:
                y = (y.movedim(-1, 1) if as_rows else y) + lora_conv_delta(ad, call)
                as_rows = False
                continue
            if rows_x is None and not ad.form.multiplicative:
                rows_x = patch_rows(call, tuple(out.shape[-2:]))
            y = ad(rows_x, y if as_rows else y.movedim(1, -1), weight)
            as_rows = True
        if shifted:
            rows_x = patch_rows(call, tuple(out.shape[-2:])) if rows_x is None else rows_x
            y = sum((self.adapters[n].unshift(rows_x) for n in shifted), y if as_rows else y.movedim(1, -1))
            as_rows = True
        if as_rows:
            y = y.movedim(-1, 1)
        if call["bias"] is not None:
            y = y + call["bias"].view(1, -1, 1, 1)
        return y.squeeze(0) if unbatched else y
