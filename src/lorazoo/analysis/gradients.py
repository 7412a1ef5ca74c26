"""Effective rank of the full-weight gradients (the unified study's Eq. 54; RaLoRA's "gradient
intrinsic dimensionality").

For each target layer, G = dL/dW (out, in) averaged over a few batches, gathered by the same
calibration pass the data-driven inits use (lorazoo.inits.calibration.collect: hooks, no weight
gets ``requires_grad``), then ``erank(G) = exp(-Σ p log p)``, ``p = σ/Σσ``
(lorazoo.analysis.spectrum.effective_rank; RaLoRA floors it at 1 for its block count, not here).

``at="base"`` measures the pre-trained model (the adapter disabled, as RaLoRA's calibration at
init); ``at="adapted"`` the model with the adapter: G is then still the gradient with respect to
the frozen weight W, taken at the adapted model.
"""
from __future__ import annotations

import contextlib

from ..errors import LorazooError
from .spectrum import spectrum

AT = ("base", "adapted")


def gradient_spectra(model, handle, batches, at: str = "base", top: int = 8) -> dict[str, dict]:
    """{layer path: :func:`lorazoo.analysis.spectrum.spectrum` of G = dL/dW} over ``handle``'s layers,
    G averaged over ``batches`` (dicts of keyword arguments for ``model(**batch)``, with labels)."""
    from ..conv import ConvAdaptedLayer
    from ..inits.calibration import collect

    if at not in AT:
        raise LorazooError(f"at must be one of {', '.join(AT)}, got {at!r}")
    layers = handle.layers()
    convs = [p for p, m in layers.items() if isinstance(m, ConvAdaptedLayer)]
    if convs:
        raise LorazooError(f"gradient ranks are measured on linear layers; {', '.join(convs[:3])} are convolutions")
    ctx = handle.disabled() if at == "base" else contextlib.nullcontext()
    with ctx:
        stats = collect(model, layers, batches, ["grad"], who="the gradient-rank analysis")
    return {p: spectrum(s.grad, top=top) for p, s in stats.items()}


def gradient_effective_ranks(model, handle, batches, at: str = "base") -> dict[str, float]:
    """{layer path: erank(dL/dW)} (study Eq. 54); see :func:`gradient_spectra`."""
    return {p: s["effective_rank"] for p, s in gradient_spectra(model, handle, batches, at=at).items()}
