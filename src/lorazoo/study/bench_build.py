"""One runner per benchmarked method: the frozen floor, lorazoo, or PEFT (bench_peft)."""
from __future__ import annotations

from torch import nn

from ..errors import SpecError
from .bench_peft import peft_runner
from .bench_runner import COMPILED, IMPLS, BenchConfig, Method, Runner, build_base, floor_runner, lorazoo_runner


def build_runner(method: Method, cfg: BenchConfig, batch: dict, model: nn.Module | None = None) -> Runner:
    """Build ``method`` on ``model`` (a fresh base model if None)."""
    if method.impl not in IMPLS:
        raise SpecError(f"unknown implementation {method.impl!r}; known: {', '.join(IMPLS)}")
    model = build_base(cfg) if model is None else model
    if method.impl == "floor":
        return floor_runner(method, model, batch)
    if method.impl in ("lorazoo", COMPILED):
        return lorazoo_runner(method, cfg, model, batch, compile=method.impl == COMPILED)
    return peft_runner(method, cfg, model, batch)
