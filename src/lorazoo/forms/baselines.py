"""Registers the LoRA paper's baselines (forms ``selection``, ``adapter_h``, ``adapter_l``); the code and
its reasoning are in lorazoo.baselines."""
from ..baselines import AdapterH, AdapterL, Selection  # noqa: F401  (registration)
