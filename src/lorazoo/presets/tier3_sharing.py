"""Tier 3, sharing across modules (study II-B2)."""
from . import preset as _p  # noqa: F401

PRESETS = [
]
