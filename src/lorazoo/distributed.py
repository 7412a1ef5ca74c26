"""What lorazoo needs from torch.distributed: who writes files, and whole tensors from shards.

Training over several processes goes through torch's own engines: wrap the adapted model in
``DistributedDataParallel`` or shard it with FSDP2's ``fully_shard`` after ``adapt`` (every rank
builds the same adapter from the same spec and seed). lorazoo then

* reduces the calibration statistics of data-driven inits over the ranks (inits/calibration.py),
* writes adapter files from rank 0 only (``handle.save``; call it on every rank, since under FSDP
  gathering the shards is collective), and
* reads whole tensors out of FSDP2's sharded parameters (:func:`whole`).

Schedules that act on the weights (AdaLoRA's masks from the all-reduced gradients, ReLoRA's merges)
run the same on every rank because DDP and FSDP hand every rank the same gradients.
"""
from __future__ import annotations

import torch


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if initialized() else 0


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of a distributed run."""
    return rank() == 0


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor behind ``t``: FSDP2 keeps parameters as sharded DTensors (gathering is
    collective: every rank must call this); plain tensors come back as they are."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (itself in one process)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over the ranks, in float64 (itself in one process)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)
