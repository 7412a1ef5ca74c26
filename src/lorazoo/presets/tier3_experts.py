"""Tier 3, mixtures of low-rank experts (study II-E)."""
from . import preset as _p  # noqa: F401

PRESETS = [
]
