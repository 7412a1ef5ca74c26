"""LoftQ: quantize the base and start the adapter on the quantization error (Li et al., 2023).

LoftQ (Algorithm 1 of its paper) looks for a quantized Q and a rank-r update with Q + s·B·A ≈ W
for the full-precision weight W (out, in), by alternating, from B·A = 0, for t = 1..T:

    Q_t       = q(W - s·B_{t-1}·A_{t-1})          (quantize what the adapter does not hold)
    s·B_t·A_t = SVD_r(W - Q_t)                    (the best rank-r fit of the quantization error)

and returns Q_T as the new frozen (quantized) base and B_T, A_T as the adapter: the adapted model
starts at Q_T + s·B_T·A_T, closer to W than QLoRA's start q(W) (tested: the error
‖W - Q_T - s·B_T·A_T‖ falls with T). Like PEFT's ``loftq_init``, the SVD factors are split evenly,
B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_rᵀ; the 1/s is ours (as PiSSA's code), so Q + s·B·A ≈ W
holds for any alpha (PEFT sets B = U_r sqrt(S_r), right only when s = 1).

Options: ``loftq_iter`` T (default 1, PEFT's ``LoftQConfig`` default), ``loftq_quant`` ("nf4"
default, "fp4", "int8") and ``loftq_backend`` ("bitsandbytes" default, "torchao": nf4 only). q is
exactly the backend's quantizer (lorazoo.qbase.quantized_linear), so Q_T is the very layer the model
then holds: the init replaces each targeted nn.Linear inside its adapted layer by that quantized
layer (QLoRA's memory saving). So LoftQ needs the full-precision weights: a target that is already
quantized, or that carries other adapters (whose base it would change), is refused before anything
changes. ``delete()`` of the adapter leaves the layers quantized (the full-precision weights are not
kept; keeping them would cost what quantizing saves); a failed ``adapt`` restores them.

Saving and loading: with T = 1, Q_1 = q(W), so ``lorazoo.quantize(full_precision_model, kind,
backend)`` followed by ``lorazoo.load`` rebuilds the trained model exactly. With T > 1, Q_T depends on
the intermediate factors, which are not saved: keep the quantized base with the adapter (as PEFT's
LoftQ workflow saves its base model), or load on the full-precision model for a close but not equal
start. Forms: plain B·A factors, additive (LoRA and its relatives); DoRA and LoRMA are refused
(their output is not Q x + s·B·A x, so LoftQ's fit would not be theirs).
"""
from __future__ import annotations

import torch

from .. import qbase
from ..errors import SpecError
from ..parts import Init, check_choice, check_number
from ..registry import INITS
from .calibration import work_dtype
from .svd import set_factors

KINDS = {"bitsandbytes": ("nf4", "fp4", "int8"), "torchao": ("nf4",)}


@torch.no_grad()
def loftq(weight: torch.Tensor, rank: int, scale: float, iters: int, quantizer):
    """LoftQ's alternation. ``quantizer(W)`` returns (layer, dequantized weight). Returns
    (quantized layer Q_T, B_T, A_T) with Q_T + scale·B_T·A_T ≈ weight."""
    W = weight.detach().to(work_dtype(weight.dtype))
    low = torch.zeros_like(W)  # s·B_{t-1}·A_{t-1}
    for _ in range(iters):
        layer, deq = quantizer(W - low)
        U, S, Vh = torch.linalg.svd(W - deq.to(W.dtype), full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
        low = (U * S) @ Vh
    root = (S / scale).sqrt()
    return layer, U * root, root[:, None] * Vh


@INITS.register("loftq", paper="LoftQ (Li et al., 2023)",
                equations="LoftQ Alg. 1: Q_t = q(W - s·B_{t-1}A_{t-1}), s·B_tA_t = SVD_r(W - Q_t), t = 1..T; "
                          "PEFT loftq_init",
                summary="quantizes the base and starts the adapter on the quantization error: Q + s·B·A ≈ W")
class LoftQ(Init):
    """LoftQ: the targeted layers become quantized, the adapter starts on their quantization error."""

    starts_as_base = False  # Q_T + s·B·A is close to W, not equal to it
    options = {"loftq_iter": 1, "loftq_quant": "nf4", "loftq_backend": "bitsandbytes"}

    @classmethod
    def validate(cls, opts):
        check_number("loftq_iter", opts["loftq_iter"], minimum=1, integer=True)
        check_choice("loftq_backend", opts["loftq_backend"], KINDS)
        if opts["loftq_quant"] not in KINDS[opts["loftq_backend"]]:
            raise SpecError(f"loftq_quant must be one of {', '.join(KINDS[opts['loftq_backend']])} with "
                            f"loftq_backend={opts['loftq_backend']!r}, got {opts['loftq_quant']!r}")

    @classmethod
    def check_form(cls, form_cls):
        super().check_form(form_cls)
        if form_cls.reads_output or form_cls.multiplicative:
            raise SpecError(f"init 'loftq' fits Q + s·B·A to W, an additive update; form "
                            f"'{form_cls.part_name}' rescales or transforms the output instead; use 'lora' or "
                            f"another additive B·A form")

    def prepare(self, model, targets, calibration):
        from torch import nn

        from ..layer import AdaptedLayer

        backend = self.spec.options["loftq_backend"]
        if not qbase.available(backend):
            raise SpecError(f"init 'loftq' quantizes with {backend}, which is not installed; "
                            f"pip install 'lorazoo[quant]'")
        for path, base in targets.items():
            wrapper = model.get_submodule(path)
            if qbase.is_quantized(base):
                raise SpecError(f"init 'loftq' needs the full-precision weight of {path!r}, which is already "
                                f"quantized: adapt the full-precision model with init='loftq' (it quantizes the "
                                f"targeted layers itself)")
            if type(base) is not nn.Linear:
                raise SpecError(f"init 'loftq' replaces nn.Linear layers by quantized ones; {path!r} is a "
                                f"{type(base).__name__}")
            if isinstance(wrapper, AdaptedLayer) and len(wrapper.adapters):
                raise SpecError(f"init 'loftq' replaces the base of {path!r} by its quantization, which would "
                                f"change adapter(s) {list(wrapper.adapters)} already there; delete them first")
            why = qbase.unsupported(backend, self.spec.options["loftq_quant"], base.weight)
            if why:
                raise SpecError(f"init 'loftq' cannot quantize {path!r}: {why}")

    @torch.no_grad()
    def apply(self, path, adapter, layer, weight):
        opts = self.spec.options
        bias = layer.base.bias

        def quantizer(w):
            q = qbase.quantized_linear(w.to(weight.dtype), bias, opts["loftq_quant"], opts["loftq_backend"])
            return q, qbase.dequantize(q)

        q, B, A = loftq(weight, adapter.form.rank, adapter.form.scale, opts["loftq_iter"], quantizer)
        set_factors(adapter, weight, B.to(weight.dtype), A.to(weight.dtype), shift=False)
        layer.base = q  # the adapted layer now holds Q_T; adapt's rollback puts the original layer back
