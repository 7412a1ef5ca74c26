"""Tier 3, rank allocation (study II-B3)."""
from . import preset as _p  # noqa: F401

PRESETS = [
    _p("salora", "SaLoRA: hard-concrete L0 gate per rank, rank budget by Lagrangian relaxation", "II-B3",
       "form, schedule", "study Eq. 46-49 [56]", tier=3, form="salora", schedule="salora"),
    _p("sora", "SoRA: gate vector between A and B, sparsified by proximal (soft-threshold) steps", "II-B3",
       "form, schedule", "[57]; authors' code (xi = 3e-4 per step)", tier=3, form="sora", schedule="sora"),
    _p("increlora", "IncreLoRA: ranks grown from 1 toward an average of 8 (at most 16 per layer) by layer "
       "importance, advance learning", "II-B3", "form, schedule", "study Eq. 45 [59]; authors' code", tier=3,
       form="increlora", schedule="increlora", rank=16, scale="adalora", alpha=64),
    _p("alora", "ALoRA: 8 of 16 rank slots active, scored by ablation (AB-LoRA), the least important moved "
       "to unpruned layers", "II-B3", "form, schedule", "study Eq. 50 [60]", tier=3, form="alora",
       schedule="alora", rank=16),
    _p("gora", "GoRA: per-layer ranks from calibration-gradient importance under LoRA's parameter budget, B "
       "from the pseudo-inverse of a random A against the gradient", "II-B3, II-D2", "init (data), rank allocation",
       "study Eq. 51-53, 107-109 [62]; authors' code", tier=3, init="gora", scale="rslora", gora_gamma=0.02),
    _p("ralora", "RaLoRA: per-layer count of block-diagonal mini LoRAs aligned to the calibration gradient's "
       "effective rank (ralora_pro=True: ranks allocated by gradient importance too)", "II-B3",
       "init (data), form", "study Eq. 54, 14-15 [63]; authors' code", tier=3, form="ralora", init="ralora"),
    _p("autolora", "AutoLoRA: a selection variable per rank-1 component meta-learned on validation batches "
       "(first-order meta step), thresholded at 1/r, kept ranks retrained", "II-B3", "form, schedule",
       "[58]; authors' code", tier=3, form="autolora", schedule="autolora"),
    _p("bilora", "BiLoRA: AdaLoRA's pseudo-SVD form, singular vectors trained on one data split and singular "
       "values on another, alternating first-order steps", "II-B3", "optim", "[61]", tier=3, form="adalora",
       optim="bilora", scale="adalora"),
]
