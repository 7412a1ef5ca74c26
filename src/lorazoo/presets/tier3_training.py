"""Tier 3, the remaining inits, optimizers and schedules."""
from . import preset as _p  # noqa: F401

PRESETS = [
]
