"""One calibration pass for the data-driven inits (LoRA-GA, EVA, ...).

An init declares what it needs in ``collects`` ("grad", "cov"); :func:`collect` runs the
calibration batches once through the model and gathers, for every target layer at once:

- ``grad``: the full-weight gradient G = dL/dW (out, in), averaged over batches. Each layer's
  G_batch = Σ_rows grad_outᵀ · x is formed from a forward hook (the input x) and a hook on the
  output's gradient; no weight gets ``requires_grad``, so no .grad is kept for the model's
  weights and autograd only tracks the graph from the first target layer on.
- ``cov``: the uncentered input second moment C = Σ_rows x xᵀ (in, in) and the row count
  (rows where ``attention_mask`` is 0 are left out when the batch has one of the input's shape).

Under torch.distributed, each process passes its own shard of the calibration data and the sums
are all-reduced (:func:`reduce_across_ranks`): every rank gets the statistics of all the data.

The model runs in eval mode (no dropout: the statistics are those of the deterministic model).
Memory does not grow with the data: per layer one (out, in) or (in, in) accumulator, in at least
float32, on the layer's device. The model's train/eval modes and ``requires_grad`` flags are
restored afterwards, and the hooks removed, also when a batch fails.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SpecError
from ..layer import AdaptedLayer, is_conv1d
from ..parts import Init
from ..qbase import is_quantized

NEEDS = ("grad", "cov")


@dataclass
class LayerStats:
    """What the calibration pass saw at one target layer."""

    grad: torch.Tensor | None = None  # mean over batches of dL/dW, (out, in)
    cov: torch.Tensor | None = None   # Σ over input rows of x xᵀ, (in, in)
    rows: int = 0                     # input rows seen (after the attention mask)
    calls: int = 0                    # forward calls of the layer


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like layer (HF Conv1D stores its weight as (in, out))."""
    if is_quantized(module):  # its weight is stored packed (lorazoo.qbase)
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, for statistics and decompositions of low-precision weights."""
    return torch.promote_types(dtype, torch.float32)


def collect(model: nn.Module, targets: dict[str, nn.Module], calibration: Iterable | None,
            needs: Iterable[str], who: str = "this init") -> dict[str, LayerStats]:
    """Run ``calibration`` (batches of keyword arguments for ``model``) once; return stats per path."""
    needs = set(needs)
    unknown = needs - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown calibration statistics {sorted(unknown)}; known: {NEEDS}")
    if calibration is None:
        raise SpecError(f"{who} is data-driven: pass calibration=<iterable of batches> to adapt()")
    convs = [p for p, m in targets.items() if isinstance(m, nn.Conv2d)]
    if convs:
        raise SpecError(f"{who} does not support Conv2d targets yet (its statistics read layer inputs as "
                        f"rows): {', '.join(convs[:3])}; use a weight-based or default init on conv layers")
    want_grad, want_cov = "grad" in needs, "cov" in needs
    stats = {p: LayerStats() for p in targets}
    state = {"mask": None}
    hooks = []

    def accumulate(path, name, value):
        old = getattr(stats[path], name)
        setattr(stats[path], name, value if old is None else old.add_(value))

    def make_hook(path, module):
        n_in, n_out = shape_of(module)
        dtype = work_dtype(module.weight.dtype)

        def hook(mod, args, out):
            if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(out):
                raise SpecError(f"{who}: layer {path!r} was called without a tensor input; cannot calibrate it")
            x = args[0].detach()
            stats[path].calls += 1
            if want_cov:
                rows = x
                mask = state["mask"]
                if mask is not None and mask.shape == x.shape[:-1]:
                    rows = x[mask.to(torch.bool)]
                rows = rows.reshape(-1, n_in).to(dtype)
                stats[path].rows += rows.shape[0]
                accumulate(path, "cov", rows.T @ rows)
            if not want_grad:
                return None
            replaced = None
            if not out.requires_grad:  # first target on the path: start the graph here
                out = replaced = out.detach().requires_grad_(True)
            out.register_hook(lambda g: accumulate(
                path, "grad", g.reshape(-1, n_out).to(dtype).T @ x.reshape(-1, n_in).to(dtype)))
            return replaced

        return hook

    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    batches = 0
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        for path, module in targets.items():
            hooked = model.get_submodule(path)  # an AdaptedLayer runs its base without calling it
            hooked = hooked if isinstance(hooked, AdaptedLayer) else module
            hooks.append(hooked.register_forward_hook(make_hook(path, module)))
        device = next(iter(targets.values())).weight.device
        for batch in calibration:
            if not isinstance(batch, Mapping):  # dict, or HF BatchEncoding (a UserDict)
                raise SpecError(f"{who}: calibration batches must be dicts of keyword arguments for "
                                f"model(**batch), got {type(batch).__name__}")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            mask = batch.get("attention_mask")
            state["mask"] = mask if torch.is_tensor(mask) else None
            batches += 1
            if not want_grad:
                with torch.no_grad():
                    model(**batch)
                continue
            with torch.enable_grad():
                loss = _loss(model(**batch), who)
                if not loss.requires_grad:
                    raise SpecError(f"{who}: the calibration loss does not depend on the target layers")
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    if batches == 0:
        raise SpecError(f"{who}: the calibration iterable yielded no batch; pass at least one batch")
    unused = [p for p, s in stats.items() if s.calls == 0]
    if unused:
        raise SpecError(f"{who}: the calibration batches never reached layer(s) {', '.join(unused[:5])}; "
                        f"exclude them from targets or pass batches that use them")
    for path, s in stats.items():
        if want_grad and s.grad is None:  # called, but the loss does not depend on its output
            n_in, n_out = shape_of(targets[path])
            w = targets[path].weight
            s.grad = torch.zeros(n_out, n_in, dtype=work_dtype(w.dtype), device=w.device)
    batches = reduce_across_ranks(stats, batches)
    for s in stats.values():
        if want_grad:
            s.grad.div_(batches)
    return stats


def reduce_across_ranks(stats: dict[str, LayerStats], batches: int) -> int:
    """Under torch.distributed each process calibrates on its own shard of the data: sum the
    statistics (gradient sums, second moments, row and batch counts) over the processes, so every
    rank starts from the statistics of all the data, as one process would. Returns the total
    number of batches. A no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batches
    counts = torch.tensor([batches] + [s.rows for s in stats.values()], dtype=torch.float64)
    dist.all_reduce(counts)
    for s, rows in zip(stats.values(), counts[1:].tolist()):
        s.rows = int(rows)
        for name in ("grad", "cov"):
            t = getattr(s, name)
            if t is not None:
                dist.all_reduce(t)
    return int(counts[0])


def _loss(output, who: str) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if not torch.is_tensor(loss):
        raise SpecError(f"{who} needs a loss: the model's output for a calibration batch has no .loss "
                        f"(include the labels in each batch)")
    if loss.dim() != 0:
        raise SpecError(f"{who}: the calibration loss must be a scalar, got shape {tuple(loss.shape)}")
    return loss


def rank_summary(handle) -> dict:
    """For inits that set each layer's rank from the data (EVA, GoRA, RaLoRA): {"ranks": {path: r},
    "total": N, "capacity": the spec's rank times the layers (LoRA's budget)}, as the rank
    allocators report theirs (``lorazoo train`` prints it)."""
    ranks = dict(handle.ranks)
    return {"ranks": ranks, "total": sum(ranks.values()), "capacity": handle.spec.rank * len(ranks)}


class CalibratedInit(Init):
    """A data-driven init: ``prepare`` runs the calibration pass and keeps ``self.stats``."""

    needs_calibration = True
    collects: tuple[str, ...] = ()

    def check_targets(self, targets: dict[str, nn.Module]) -> None:
        """Refuse targets before the (costly) pass; override to check shapes against the rank."""

    def prepare(self, model, targets, calibration) -> None:
        self.check_targets(targets)
        self.stats = collect(model, targets, calibration, self.collects, who=f"init '{self.part_name}'")
