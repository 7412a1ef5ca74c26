"""Custom backward functions under autocast.

A custom autograd function's backward runs outside autocast: the bf16/fp16 activations and gradients
autocast made in the forward meet the float32 parameters there, and a matmul of the two fails.
:func:`promoted` brings a backward's tensors to their common dtype first (the engine casts each
returned gradient back to its input's dtype).
"""
from __future__ import annotations

import functools

import torch


def promoted(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``tensors`` in their common (promoted) dtype; None stays None."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))
    return [None if t is None else t.to(dtype) for t in tensors]
