"""Quantized base layers (QLoRA): recognize them, dequantize their weight, write a new one.

Three kinds of quantized linear layer are recognized, from the libraries users already have:

- bitsandbytes ``Linear4bit`` (NF4 or FP4, blockwise absmax, optionally double-quantized scales),
- bitsandbytes ``Linear8bitLt`` (LLM.int8(): int8 rows with one absmax scale per output row),
- an ``nn.Linear`` whose weight is torchao's ``NF4Tensor`` (QLoRA's NF4, torchtune's layout).

The base forward always stays the library's own; lorazoo only needs the frozen weight as a dense
(out, in) tensor where a form or an init reads it (DoRA's norm, HiRA, LoRMA, PiSSA's SVD...), and
then builds it one layer at a time (:func:`dequantize`), never a full-precision copy of the model.
A base change (PiSSA's residual, ReLoRA's merges, a loaded base shift) is written back by
re-quantizing the changed dense weight with the layer's own settings (:func:`requantize`).

This module imports no quantization library at import time: each is imported only when a layer
of its kind is met, so lorazoo runs without them.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import LorazooError

# Relative RMS error of one quantization of a weight (‖Q(W) - W‖ / ‖W‖) that fingerprint checks allow
# for. Measured on Kaiming-uniform 512 x 256 weights: NF4 (bnb and torchao, blocks of 64) 0.091, FP4
# 0.111, LLM.int8 rows 0.004; the allowance is about 1.3x (4-bit) and 2.5x (int8) that.
RELATIVE_ERROR = {"nf4": 0.13, "fp4": 0.15, "int8": 0.01}


def _bnb_kind(module: nn.Module) -> str | None:
    cls = type(module)
    if not cls.__module__.startswith("bitsandbytes"):
        return None
    names = {c.__name__ for c in cls.__mro__}
    if "Linear4bit" in names:
        return getattr(module.weight, "quant_type", "nf4")
    if "Linear8bitLt" in names:
        return "int8"
    return None


def _is_nf4_tensor(t) -> bool:
    return any(c.__name__ == "NF4Tensor" for c in type(t).__mro__)


def kind(module: nn.Module) -> str | None:
    """'nf4', 'fp4' or 'int8' for a quantized linear layer, None for any other module."""
    k = _bnb_kind(module)
    if k is not None:
        return k
    if isinstance(module, nn.Linear) and _is_nf4_tensor(module.weight):
        return "nf4"
    return None


def backend(module: nn.Module) -> str | None:
    """'bitsandbytes' or 'torchao' for a quantized layer, None otherwise."""
    if _bnb_kind(module) is not None:
        return "bitsandbytes"
    if isinstance(module, nn.Linear) and _is_nf4_tensor(module.weight):
        return "torchao"
    return None


def is_quantized(module: nn.Module) -> bool:
    return kind(module) is not None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the layer computes in and dequantizes to (its adapters take it too)."""
    w = module.weight
    if _is_nf4_tensor(w):
        return w.dtype
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # bitsandbytes' CPU inference packing sets dtype to bfloat16 and keeps the original
        return qs.original_dtype if getattr(qs, "packing_format_for_cpu", False) else qs.dtype
    dt = getattr(module, "_lorazoo_dtype", None) or getattr(module, "compute_dtype", None)
    if dt is None and module.bias is not None:
        dt = module.bias.dtype
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a new dense (out, in) tensor in its compute dtype."""
    w = module.weight
    if _is_nf4_tensor(w):
        return w.get_original_weight()
    k = _bnb_kind(module)
    if k in ("nf4", "fp4"):
        import bitsandbytes.functional as bf

        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU inference path repacked the weight in its first no-grad eval forward (scales
            # rounded to bfloat16); undo the layout in place, as bitsandbytes' own state_dict does
            w.data, w.quant_state = bf._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        return bf.dequantize_4bit(w.data, w.quant_state).to(compute_dtype(module))
    if k == "int8":
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        if scb is None:
            raise LorazooError("this Linear8bitLt holds no quantization statistics (SCB): move it to its device "
                               "once (model.to(device)) so bitsandbytes quantizes it, then adapt")
        return (w.data.float() * (scb.float()[:, None] / 127.0)).to(compute_dtype(module))
    raise LorazooError(f"{type(module).__name__} is not a quantized layer lorazoo knows")


@torch.no_grad()
def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's quantized weight by the quantization of the dense (out, in) ``weight``, with
    the layer's own settings (quant type, block sizes, storage); the layer object stays the same."""
    w = module.weight
    if _is_nf4_tensor(w):
        module.weight = nn.Parameter(torchao_to_nf4()(weight.to(w.dtype).contiguous(), w.block_size, w.scaler_block_size),
                                     requires_grad=False)
        return
    k = _bnb_kind(module)
    if k in ("nf4", "fp4"):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        dt = compute_dtype(module)
        packed, state = bf.quantize_4bit(weight.to(dt).contiguous(), blocksize=w.blocksize,
                                         compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                         quant_storage=w.quant_storage)
        module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=w.blocksize,
                                          compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                          quant_storage=w.quant_storage, module=module, bnb_quantized=True)
        return
    if k == "int8":
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        CB, SCB, _ = bf.int8_vectorwise_quant(weight.to(torch.float16 if weight.is_cuda else torch.float32)
                                              .contiguous())
        module.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        module.state.CB, module.state.SCB = None, None  # the next forward takes the new ones
        return
    raise LorazooError(f"{type(module).__name__} is not a quantized layer lorazoo knows")


def torchao_to_nf4():
    """torchao's ``to_nf4`` (``torchao.dtypes.nf4tensor`` in older releases)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    return to_nf4


def available(backend: str) -> bool:
    """Whether ``backend`` ('bitsandbytes' or 'torchao') can be imported here."""
    try:
        if backend == "bitsandbytes":
            import bitsandbytes  # noqa: F401
        else:
            torchao_to_nf4()
    except ImportError:
        return False
    return True


def unsupported(backend: str, kind: str, weight: torch.Tensor) -> str | None:
    """Why the backend cannot quantize this (out, in) weight correctly here, or None when it can."""
    out_f, in_f = weight.shape
    if backend == "torchao" and weight.numel() % (64 * 256):
        return (f"torchao's NF4 needs in·out divisible by 16384 (blocks of 64 whose scales split into blocks "
                f"of 256); this layer is {in_f} -> {out_f}")
    if backend == "bitsandbytes" and kind in ("nf4", "fp4") and weight.device.type == "cpu" and in_f % 64:
        # measured with bitsandbytes 0.50.2: quantize_4bit is right, but the CPU dequantize/matmul kernels
        # index the scales per row, so e.g. a 16 x 16 weight comes back with 25-50 % error instead of 9 %
        return (f"bitsandbytes' CPU 4-bit kernels compute wrongly when in_features is not a multiple of the "
                f"block size 64; this layer is {in_f} -> {out_f} (use int8, torchao, or a GPU)")
    return None


@torch.no_grad()
def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, kind: str = "nf4",
                     backend: str = "bitsandbytes", compute_dtype=None, double_quant: bool = False) -> nn.Module:
    """A new quantized layer computing ``weight`` (out, in) (and ``bias``): bitsandbytes' Linear4bit
    ("nf4"/"fp4", blocks of 64) or Linear8bitLt ("int8", no outlier threshold), or an nn.Linear with a
    torchao NF4Tensor weight (blocks of 64, scales in blocks of 256)."""
    w = weight.detach()
    out_f, in_f = w.shape
    dt = compute_dtype or w.dtype
    why = unsupported(backend, kind, w)
    if why:
        raise LorazooError(why)
    if backend == "torchao":
        q = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        q.weight = nn.Parameter(torchao_to_nf4()(w.to(dt).contiguous(), 64, 256), requires_grad=False)
    else:
        import bitsandbytes as bnb

        # empty placeholders with the layer's settings, which requantize reads
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=0.0,
                                    device="meta")
            q._lorazoo_dtype = dt
            q.weight = bnb.nn.Int8Params(torch.empty(0, dtype=torch.int8, device=w.device), requires_grad=False,
                                         has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=dt,
                                  compress_statistics=double_quant, quant_type=kind, device="meta")
            q.weight = bnb.nn.Params4bit(torch.empty(0, dtype=torch.uint8, device=w.device), requires_grad=False,
                                         blocksize=64, compress_statistics=double_quant, quant_type=kind, module=q)
            # bitsandbytes' CPU inference path (AVX512-BF16; eval mode without grad) repacks the weight in place
            # in its first forward and rounds the block scales to bfloat16 for good, moving the weights by 1-2 %
            # (measured), and it fails when out % 32 != 0: layers made here keep the exact path
            q.support_avx512bf16_for_cpu = False
        requantize(q, w.to(dt))
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().to(dt).clone(), requires_grad=False)
    return q


def stored_bytes(module: nn.Module) -> int:
    """Bytes the layer's weight takes as stored (packed codes and scales for a quantized one)."""
    w = module.weight
    if _is_nf4_tensor(w):
        parts = [w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4]
        return sum(t.numel() * t.element_size() for t in parts)
    n = w.numel() * w.element_size()
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        n += qs.absmax.numel() * qs.absmax.element_size()
        if getattr(qs, "state2", None) is not None:
            n += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
    scb = getattr(w, "SCB", None)
    if scb is None and hasattr(module, "state"):
        scb = getattr(module.state, "SCB", None)
    if scb is not None:
        n += scb.numel() * scb.element_size()
    return n


def coarsest(kinds) -> str | None:
    """The kind with the largest quantization error among ``kinds`` (None entries ignored)."""
    kinds = [k for k in kinds if k]
    return max(kinds, key=lambda k: RELATIVE_ERROR.get(k, 0.2)) if kinds else None


def layers_kind(layers: dict) -> str | None:
    """The coarsest quantization among ``layers`` (adapted layers are looked at through their base)."""
    return coarsest(kind(getattr(m, "base", m)) for m in layers.values())


def quantization_note(layers: dict) -> dict:
    """``{"base_quantization": kind}`` for a saved adapter's config when its layers are quantized, else {}."""
    k = layers_kind(layers)
    return {"base_quantization": k} if k else {}
