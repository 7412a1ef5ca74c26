"""Tier 3, the remaining forms (study II-B1, II-C2, II-D1)."""
from . import preset as _p  # noqa: F401

PRESETS = [
]
