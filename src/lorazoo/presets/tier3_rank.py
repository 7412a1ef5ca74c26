"""Tier 3, rank allocation (study II-B3)."""
from . import preset as _p  # noqa: F401

PRESETS = [
]
