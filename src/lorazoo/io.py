"""Load a saved adapter onto a model: every check first, then attach (``handle.save`` writes)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from . import qbase
from .adapt import adapt
from .errors import LoadError, LorazooError, SpecError
from .files import read_config, read_tensors
from .fingerprint import fingerprint, mismatches
from .handle import AdapterHandle, handles_of
from .layer import base_weights
from .spec import AdapterSpec
from .targets import candidate_layers

def load(model: nn.Module, path, name: str | None = None) -> AdapterHandle:
    """Load a saved adapter onto ``model`` and return its handle.

    Every check (config, version, file integrity, base fingerprint, tensor names and shapes) runs
    before the model is changed; on any error the model is left as it was.
    """
    path = Path(path)
    config = read_config(path)
    name = name or config.get("name", "default")
    try:
        spec = AdapterSpec.from_dict(config["spec"])
    except (SpecError, TypeError, ValueError) as e:
        raise LoadError(f"the saved spec is not valid for this lorazoo: {e}") from None
    if name in handles_of(model):
        raise LoadError(f"model already has an adapter named {name!r}; pass name=... to load it under another")
    tensors = read_tensors(path, config)

    layers = candidate_layers(model)
    missing = [p for p in config["ranks"] if p not in layers]
    if missing:
        raise LoadError(f"the model has no layer(s) {', '.join(missing[:5])} that this adapter was made for; "
                        f"load it onto the base model it was trained on")
    saved_fp = config.get("fingerprint", {})
    current_fp = fingerprint(base_weights({p: layers[p] for p in saved_fp if p in layers}))
    # a quantized base on either side (QLoRA): compare within the quantization's error (lorazoo.qbase)
    quant = qbase.coarsest([config.get("base_quantization"),
                            qbase.layers_kind({p: layers[p] for p in saved_fp if p in layers})])
    q = qbase.RELATIVE_ERROR.get(quant, 0.2) if quant else 0.0
    bad = mismatches(saved_fp, current_fp, quant_error=q)
    if bad:
        raise LoadError(
            f"this adapter was made for a different base model (fingerprint {config.get('base_fingerprint')}); "
            f"weights differ at {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
            + (f" (even allowing for {quant} quantization: norms within {q:.0%}, sums within 4x the quantization "
               f"noise)" if quant else "")
        )
    if quant and mismatches(saved_fp, current_fp):
        warnings.warn(
            f"the adapter was saved on a {'quantized' if config.get('base_quantization') else 'full-precision'} "
            f"base and is loaded on a {'quantized' if qbase.layers_kind(layers) else 'full-precision'} one: the "
            f"base fingerprint was compared within {quant} quantization error (norms within {q:.0%}), which "
            f"still refuses another model but not a lightly fine-tuned one; outputs differ by the quantization "
            f"error", stacklevel=2)
    targets = sorted(config["ranks"])
    spec_t = AdapterSpec.from_dict({**config["spec"], "targets": targets or config["spec"].get("targets")})  # none: FT

    def fill(handle):
        handle.spec = spec
        _load_state(handle, tensors)

    return adapt_then_fill(model, spec_t, fill, name=name, ranks=config["ranks"], initialize=False,
                           misfit="the saved adapter does not fit this model",
                           broken="the adapter file does not fit its spec")


def adapt_then_fill(model: nn.Module, spec: AdapterSpec, fill, *, name: str, ranks, initialize: bool, misfit: str,
                    broken: str) -> AdapterHandle:
    """``adapt`` the model, then ``fill(handle)`` with loaded tensors. Any failure leaves the model as it
    was (adapt undoes itself; a failed fill deletes the handle and restores requires_grad) and raises
    LoadError: "misfit: ..." when the model refuses the spec, "broken: ..." when the tensors do not fit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        handle = adapt(model, spec, name=name, ranks=ranks, _initialize=initialize)
    except LorazooError as e:
        raise LoadError(f"{misfit}: {e}") from None
    try:
        fill(handle)
    except BaseException as e:
        handle.delete()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if isinstance(e, LoadError) or not isinstance(e, Exception):
            raise
        raise LoadError(f"{broken}: {e}") from None
    return handle


@torch.no_grad()
def _load_state(handle: AdapterHandle, tensors: dict[str, torch.Tensor]) -> None:
    own = handle.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise LoadError(f"adapter file does not match its spec: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in own.items():
        t = tensors[k]
        resizable = k.endswith((".shift_A", ".shift_B"))
        if t.shape != v.shape and not resizable:
            raise LoadError(f"tensor {k} has shape {tuple(t.shape)} in the file but {tuple(v.shape)} here")
    for path, layer in handle.layers().items():  # a base shift is B (out, k) @ A (k, in)
        B, A = tensors[f"{path}.shift_B"], tensors[f"{path}.shift_A"]
        if B.dim() != 2 or A.dim() != 2 or B.shape != (layer.out_features, A.shape[0]) or A.shape[1:] != (
                layer.in_features,):
            raise LoadError(f"the base shift of {path} has shapes {tuple(B.shape)} and {tuple(A.shape)}; a layer "
                            f"{layer.in_features} -> {layer.out_features} needs ({layer.out_features}, k) and "
                            f"(k, {layer.in_features})")
    # apply: base shifts first (they change the frozen base), then everything else
    for path, layer in handle.layers().items():
        B, A = tensors[f"{path}.shift_B"], tensors[f"{path}.shift_A"]
        if A.shape[0]:
            layer.adapters[handle.name].shift_base(layer.linear_weight(), B, A)
    for k, v in own.items():
        if not k.endswith((".shift_A", ".shift_B")):
            v.copy_(tensors[k])
