"""lorazoo.quantize(model, "nf4" | "fp4" | "int8", backend=...): quantize a model in memory (QLoRA's base).

Every nn.Linear of the model but its output heads (as transformers' ``llm_int8_skip_modules``) is
replaced by the backend's quantized layer, holding the quantization of its weight:

- ``backend="bitsandbytes"``: ``bnb.nn.Linear4bit`` for "nf4"/"fp4" (blocks of 64, QLoRA's
  ``double_quant`` optional) and ``bnb.nn.Linear8bitLt`` for "int8" (LLM.int8() rows, no outlier
  threshold); the layers' own forward runs, on CPU through bitsandbytes' CPU backend.
- ``backend="torchao"``: "nf4" only, an nn.Linear whose weight becomes torchao's ``NF4Tensor``
  (blocks of 64, scales quantized in blocks of 256, as QLoRA and torchtune).

Layers already wrapped by an adapter are quantized in place of their base, so adapting a
full-precision model with PiSSA (or any init that moves a part of W into the adapter) and then
quantizing gives the PiSSA paper's QPiSSA: the residual W - s·B·A is what gets quantized, with a
smaller error than W itself. Quantized layers are frozen (``requires_grad=False``).

Every check runs before any layer is replaced. Refused layers (qbase.unsupported): torchao needs
in·out divisible by 64·256; bitsandbytes 0.50's CPU 4-bit kernels dequantize wrongly when
in_features is not a multiple of 64 (measured: a 16 x 16 weight comes back with 25-50 % error
instead of 9 %), so such layers are refused on CPU (int8 and torchao take them; real models'
widths are multiples of 64). Layers made here keep bitsandbytes' exact CPU path: its AVX512-BF16
inference path would round the block scales to bfloat16 in place on the first eval forward.
Measured (``model_bytes``): a Llama of hidden 1024, 8 layers, MLP 2816, vocabulary 1024 goes from
424.5 MB (fp32) to 71.3 MB with NF4 (embeddings, norms and lm_head stay fp32).
"""
from __future__ import annotations

import torch
from torch import nn

from . import qbase
from .errors import SpecError
from .layer import AdaptedLayer
from .targets import HEAD_NAMES, _output_head_ids

KINDS = {"bitsandbytes": ("nf4", "fp4", "int8"), "torchao": ("nf4",)}
# ``lorazoo train --quantize`` / ``run(quantize=...)`` values: kind, or backend-kind
CHOICES = {"nf4": ("nf4", "bitsandbytes"), "fp4": ("fp4", "bitsandbytes"), "int8": ("int8", "bitsandbytes"),
           "torchao-nf4": ("nf4", "torchao")}


def parse_choice(value: str) -> tuple[str, str]:
    """(kind, backend) for a ``--quantize`` value."""
    if value not in CHOICES:
        raise SpecError(f"quantize must be one of {', '.join(CHOICES)}, got {value!r}")
    return CHOICES[value]


def quantize(model: nn.Module, kind: str = "nf4", backend: str = "bitsandbytes", *, compute_dtype=None,
             double_quant: bool = False, skip=HEAD_NAMES) -> nn.Module:
    """Quantize every nn.Linear of ``model`` in place (output heads and names in ``skip`` excepted);
    returns the model. ``compute_dtype``: the dtype the 4-bit layers compute and dequantize in (default:
    each layer's weight dtype)."""
    if backend not in KINDS:
        raise SpecError(f"backend must be one of {sorted(KINDS)}, got {backend!r}")
    if kind not in KINDS[backend]:
        raise SpecError(f"backend {backend!r} quantizes to {', '.join(KINDS[backend])}, not {kind!r}")
    _check_installed(backend)
    heads = _output_head_ids(model)
    todo = []
    bases = {id(m.base) for m in model.modules() if isinstance(m, AdaptedLayer)}
    for path, mod in list(model.named_modules()):
        holder, lin = (mod, mod.base) if isinstance(mod, AdaptedLayer) else (None, mod)
        if type(lin) is not nn.Linear or qbase.is_quantized(lin) or (holder is None and id(mod) in bases):
            continue  # an adapted layer's base is taken through its wrapper
        if id(lin) in heads or id(mod) in heads or path.split(".")[-1] in tuple(skip):
            continue
        if holder is not None and holder.merged:
            raise SpecError(f"layer {path!r} has merged adapter(s) {holder.merged}: unmerge them before quantizing")
        why = qbase.unsupported(backend, kind, lin.weight)
        if why:
            raise SpecError(f"layer {path!r} cannot be quantized to {kind} with {backend}: {why}; or leave it in "
                            f"full precision with skip=[{path.split('.')[-1]!r}, ...]")
        todo.append((path, holder, lin))
    if not todo:
        raise SpecError("the model has no nn.Linear layer to quantize (output heads are left in full precision)")
    for path, holder, lin in todo:
        q = qbase.quantized_linear(lin.weight.detach(), lin.bias, kind, backend, compute_dtype, double_quant)
        if holder is not None:
            holder.base = q
        else:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def _check_installed(backend: str) -> None:
    if not qbase.available(backend):
        raise SpecError(f"backend {backend!r} is not installed; pip install 'lorazoo[quant]'")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (quantized weights packed)."""
    total, seen = 0, set()
    for mod in model.modules():
        if qbase.is_quantized(mod):
            total += qbase.stored_bytes(mod)
            seen.add(id(mod.weight))
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and not qbase._is_nf4_tensor(t):
            total += t.numel() * t.element_size()
    return total
