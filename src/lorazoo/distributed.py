"""What lorazoo needs from torch.distributed: who writes files, and whole tensors from shards.

Training over several processes goes through torch's own engines: wrap the adapted model in
``DistributedDataParallel`` or shard it with FSDP2's ``fully_shard`` after ``adapt`` (every rank
builds the same adapter from the same spec and seed). lorazoo then

* reduces the calibration statistics of data-driven inits over the ranks (inits/calibration.py),
* writes adapter files from rank 0 only (``handle.save``; call it on every rank, since under FSDP
  gathering the shards is collective), and
* reads whole tensors out of FSDP2's sharded parameters (:func:`whole`).

Schedules that act on the weights (AdaLoRA's masks from the all-reduced gradients, ReLoRA's merges)
run the same on every rank because DDP and FSDP hand every rank the same gradients. Under FSDP2 the
adapter's parameters, gradients and optimizer states are sharded DTensors: elementwise updates run
on each shard, and whatever ranks, reduces or draws over a whole tensor (AdaLoRA's triplet scores
and orthogonality term, ReLoRA's merge, re-init and magnitude pruning) gathers it first
(:func:`whole`, exact: the adapter's factors are small) and writes back this rank's shard
(:func:`like`, :func:`reset_whole`), so every rank computes what one process computes.
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


def like(full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor, the same on every rank) laid out as ``t``: this rank's shard of it,
    as a DTensor with ``t``'s placements, when ``t`` is a sharded DTensor (no communication: each
    rank cuts its own piece); ``full`` itself otherwise. For in-place updates of FSDP2's sharded
    parameters and optimizer states by a value computed on whole tensors."""
    if not callable(getattr(t, "full_tensor", None)):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)


@torch.no_grad()
def reset_whole(module: torch.nn.Module) -> None:
    """``module.reset_parameters()`` drawing the values one process would draw: under FSDP2 the
    sharded parameters are swapped for whole copies while it runs (a random init of a sharded
    DTensor draws per shard, not the whole tensor's values), then each rank keeps its shard. The
    parameter objects (which optimizers hold) stay the same. Collective when sharded."""
    owners = [(m, n, p) for m in module.modules() for n, p in m._parameters.items()
              if p is not None and callable(getattr(p, "full_tensor", None))]
    if not owners:
        module.reset_parameters()
        return
    copies = [torch.nn.Parameter(whole(p).clone(), requires_grad=p.requires_grad) for _, _, p in owners]
    try:
        for (m, n, _), c in zip(owners, copies):
            m._parameters[n] = c
        module.reset_parameters()
    finally:
        for m, n, p in owners:
            m._parameters[n] = p
    for (_, _, p), c in zip(owners, copies):
        p.copy_(like(c.detach(), p))


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
