"""lorazoo's own trainer over several processes: the collective helpers it uses, and ``--nproc``.

When a ``torch.distributed`` process group is initialized (by :func:`spawn_run`, by ``torchrun``
plus your own ``init_process_group``, or by any launcher), :class:`lorazoo.train.Trainer`

* wraps the adapted model in ``DistributedDataParallel`` (every rank built the same adapter from
  the same spec and seed; DDP also broadcasts rank 0's parameters at the start),
* gives each rank its slice of every global batch (:func:`shard_batch`: contiguous rows) and weights
  each rank's loss by ``world * rows_r / rows_of_the_step``, so the averaged gradient is the one
  of the whole global batch and the run equals one process's on the same batches (within float
  rounding; dropout masks, drawn per rank, differ, and an aux loss is computed on each rank's slice),
* evaluates on rank 0 and hands the metrics to every rank (task metrics such as macro-F1 are not
  sums over examples, so the evaluation is not split; every rank ends with the same metrics),
* writes checkpoints from rank 0 only (atomically, as in one process) while the others wait, and
  resumes on every rank from the same checkpoint folder (a file system all ranks see).

:func:`lorazoo.run.spawn_run` is ``lorazoo train --nproc N``: N local processes (gloo, CPU) run
:func:`lorazoo.run.run` with the same arguments; rank 0 writes the output folder.
"""
from __future__ import annotations

import torch

from .distributed import (  # noqa: F401 - the collective helpers, re-exported for the trainer
    all_reduce_sum, barrier, broadcast_object, initialized, is_main_process, rank, world_size)
from .errors import LorazooError


def shard_rows(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Rank ``r``'s contiguous rows [start, stop) of a batch of ``n`` rows split over ``world`` ranks."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    return r * n // world, (r + 1) * n // world


def shard_batch(batch: dict, n: int, r: int | None = None, world: int | None = None) -> tuple[dict, int]:
    """(this rank's slice of a batch dict of ``n`` examples, its number of rows).

    Tensors whose first dimension is ``n`` are sliced, other values are kept. A rank whose slice is
    empty (a batch smaller than the world) gets the batch's first row and 0 rows: it still runs the
    forward and backward DDP needs, with weight 0.
    """
    start, stop = shard_rows(n, r, world)
    rows = stop - start
    if rows == 0:
        start, stop = 0, 1

    def cut(v):
        return v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
    return {k: cut(v) for k, v in batch.items()}, rows


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when a group of more than one process is initialized
    (a model the caller already wrapped in DDP is kept; one sharded with FSDP is refused: the
    trainer's checkpoints are written by rank 0 alone, which FSDP's collective gathers forbid)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        FSDPModule = ()
    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise LorazooError("lorazoo's Trainer runs DDP itself and cannot train an FSDP-sharded model; pass the "
                           "unwrapped model, or use your own loop or the HF Trainer for FSDP")
    if not any(p.requires_grad for p in model.parameters()):
        raise LorazooError("nothing to train: the model has no trainable parameters")
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# --- lorazoo train --nproc N ----------------------------------------------------------------------
