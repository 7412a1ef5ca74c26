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
]
