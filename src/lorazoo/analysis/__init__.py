"""Analyses of trained adapters, as in the papers: subspace similarity between adapters (LoRA Eq. 4,
Figs. 3-4), amplification of W's directions by ΔW (LoRA Table 7), rank and spectrum of ΔW, the
correlation of two updates (LoRMA Table 9), the loss-curve AUC (LoRMA Table 5) and the effective
rank of gradients (study Eq. 54, RaLoRA). Functions on tensors, plus helpers that give the tensors
of an adapter on a model (:func:`delta_weights`, :func:`lora_factors`, :func:`load_run`).
``lorazoo analyze`` runs them on saved runs.
"""
from .amplification import amplification
from .correlation import column_space, correlation, principal_angles
from .curves import auc_reduction, loss_auc
from .spectrum import effective_rank, numerical_rank, singular_values, spectrum, stable_rank
from .subspace import right_singular_basis, subspace_similarity, subspace_similarity_grid

# model-level helpers import the core (io, run, calibration); loaded on first use, so the parts that
# use the math above (inits/ralora.py) can import this package while the core is being imported
_LAZY = {"delta_weights": "adapters", "base_weights_of": "adapters", "lora_factors": "adapters",
         "load_run": "adapters", "row_spaces": "adapters", "subspace_by_layer": "adapters",
         "amplification_by_layer": "adapters", "spectrum_by_layer": "adapters", "correlation_by_layer": "adapters",
         "gradient_spectra": "gradients", "gradient_effective_ranks": "gradients"}

__all__ = ["amplification", "correlation", "column_space", "principal_angles", "loss_auc", "auc_reduction",
           "effective_rank", "numerical_rank", "singular_values", "spectrum", "stable_rank",
           "right_singular_basis", "subspace_similarity", "subspace_similarity_grid", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
