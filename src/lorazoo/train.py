"""Trainer: runs any adapter through the AdapterHandle training contract.

One optimizer step::

    for each micro-batch of the step (gradient accumulation):
        loss = model(**batch).loss + handle.aux_loss()       # weighted by its share of examples
        loss.backward()
    clip gradients (optional); handle.before_step(opt); opt.step(); opt.zero_grad()
    handle.after_step(opt, step)

The learning rate of every parameter group is its own base rate (from ``handle.param_groups``,
so LoRA+ keeps its ratio) times the warmup + decay schedule times ``handle.lr_factor(step)``
(ReLoRA's jagged restarts). Steps are numbered from 1, as in ``tests/tiny.py``.

Checkpoints (``checkpoint_dir`` + ``checkpoint_every``): every N steps, at the end of an epoch
after its evaluation when N divides that step, and at the end of the run, the trainer writes the
adapter, the optimizer state, the RNG states, the schedule and optim parts' state and its own
position (see :mod:`lorazoo.checkpoint`) into ``checkpoint_dir``, atomically, keeping the newest
``keep_checkpoints``. ``fit(batches, resume=True)`` on the same model, spec, options and data
continues from the newest one and ends with the adapter an uninterrupted run gives (within float
rounding). For that, ``batches(epoch)`` must depend on the epoch only (lorazoo's tasks shuffle by
(seed, epoch)).

A non-finite loss or gradient norm stops training with a :class:`NonFiniteError` naming the first
adapted layer (in forward order) whose output went non-finite, found by re-running the step's
micro-batches with hooks (only then, so it costs nothing while training is healthy); no
checkpoint is written from that state, so the last good one is kept.

Under torch.distributed (a process group initialized before the trainer is built; ``lorazoo train
--nproc N``) the trainer wraps the model in DistributedDataParallel, gives each rank its slice of
every global batch, evaluates on rank 0 and shares the metrics, and writes checkpoints from rank 0;
the run equals one process's on the same batches (see :mod:`lorazoo.launch`).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from . import launch
from .errors import LoadError, LorazooError
from .handle import AdapterHandle
from .memory import count_saved
from .parts import check_number

LR_SCHEDULES = ("linear", "cosine", "constant")


def schedule_factor(step: int, total: int, warmup: int, kind: str = "linear") -> float:
    """Multiplier on the base learning rate before optimizer step ``step`` (1-based) of ``total``.

    Linear warmup reaches 1 at step ``warmup``; then ``linear`` decays to 1/(total-warmup) at the
    last step (never 0, so no step is wasted), ``cosine`` follows half a cosine to near 0, and
    ``constant`` stays at 1.
    """
    if kind not in LR_SCHEDULES:
        raise LorazooError(f"unknown lr schedule {kind!r}; known: {', '.join(LR_SCHEDULES)}")
    if warmup > 0 and step <= warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup - 1) / span))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteError(LorazooError):
    """Training stopped on a non-finite loss or gradient. ``layer`` is the adapted layer found to go
    non-finite first (None when none did), ``step`` the step that failed, ``checkpoint`` the last
    good checkpoint folder (None when none was written)."""

    def __init__(self, message: str, *, step: int, layer: str | None, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.layer, self.checkpoint = step, layer, checkpoint


def check_trainer_options(*, lr: float, epochs: float = 1, accumulation: int = 1,
                          lr_schedule: str = "linear", warmup: float = 0.1, weight_decay: float = 0.0,
                          max_grad_norm: float | None = 1.0, checkpoint_every: int | None = None) -> None:
    """Raise a LorazooError (SpecError) naming the first bad training option."""
    check_number("lr", lr, strict=True)
    if checkpoint_every is not None:
        check_number("checkpoint_every", checkpoint_every, minimum=1, integer=True)
    check_number("epochs", epochs, strict=True)
    check_number("accumulation", accumulation, minimum=1, integer=True)
    check_number("warmup", warmup)
    check_number("weight_decay", weight_decay)
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, strict=True)
    if lr_schedule not in LR_SCHEDULES:
        raise LorazooError(f"unknown lr schedule {lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")


def batch_size_of(batch: dict) -> int:
    """Number of examples in a batch dict: the length of its labels, else of its first tensor."""
    t = batch.get("labels")
    if not isinstance(t, torch.Tensor):
        t = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    if t is None:
        raise LorazooError("a training batch must be a dict holding at least one tensor")
    return int(t.shape[0]) if t.dim() else 1


class Trainer:
    """AdamW over an adapter's parameter groups, with warmup + linear/cosine decay.

    ``epochs`` may be fractional (0.5 = the first half of one epoch's batches).
    ``accumulation`` micro-batches make one optimizer step; each micro-batch's loss is weighted by
    its share of the step's examples, so the gradient equals that of one big batch.
    ``warmup`` is a fraction of the optimizer steps when below 1, else a number of steps.
    ``evaluate(model) -> dict`` runs at the end of each (partial) epoch, in eval mode.
    ``progress`` shows a tqdm bar and the per-epoch metrics on stderr; off, the trainer prints nothing.
    ``checkpoint_dir`` and ``checkpoint_every`` (steps) turn checkpoints on (see the module
    docstring); ``keep_checkpoints`` is how many of the newest stay on disk; ``extra`` (a JSON
    dict) is stored in each checkpoint for the caller.
    ``distributed``: None (default) runs DDP and shards every batch by rank when a torch.distributed
    group of several processes is initialized (see the module docstring); False ignores the group
    (the caller wraps the model and gives each rank its own batches).
    """

    def __init__(self, model: nn.Module, handle: AdapterHandle, *, lr: float, epochs: float = 1,
                 accumulation: int = 1, lr_schedule: str = "linear", warmup: float = 0.1,
                 weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, progress: bool = True,
                 evaluate: Callable[[nn.Module], dict] | None = None, checkpoint_dir=None,
                 checkpoint_every: int | None = None, keep_checkpoints: int = 1, extra: dict | None = None,
                 distributed: bool | None = None):
        check_trainer_options(lr=lr, epochs=epochs, accumulation=accumulation, lr_schedule=lr_schedule,
                              warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                              checkpoint_every=checkpoint_every)
        check_number("keep_checkpoints", keep_checkpoints, minimum=1, integer=True)
        if checkpoint_every is not None and checkpoint_dir is None:
            raise LorazooError("checkpoint_every needs checkpoint_dir, the folder the checkpoints go to")
        self.model, self.handle = model, handle
        self.lr, self.epochs, self.accumulation = float(lr), float(epochs), int(accumulation)
        self.lr_schedule, self.warmup, self.weight_decay = lr_schedule, warmup, float(weight_decay)
        self.max_grad_norm, self.progress, self.evaluate = max_grad_norm, progress, evaluate
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        self.keep_checkpoints, self.extra = int(keep_checkpoints), dict(extra or {})
        self.last_checkpoint: Path | None = None  # the newest good checkpoint written or resumed from
        self.resumed_from: Path | None = None
        self._saved_step: int | None = None  # the step of the newest checkpoint written or resumed from
        if distributed not in (None, False):
            raise LorazooError(f"distributed must be None (automatic) or False, got {distributed!r}")
        self.world = launch.world_size() if distributed is None else 1
        self.net = launch.wrap_ddp(model) if self.world > 1 else model  # what the steps run
        if self.world > 1:  # evaluation and the non-finite replay use the model inside DDP
            self.model = self.net.module
        self.optimizer = torch.optim.AdamW(handle.param_groups(self.lr, self.weight_decay))
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        self.step = 0
        self.losses: list[float] = []       # mean task loss per optimizer step
        self.lrs: list[float] = []          # the first group's learning rate per step
        self.metrics_per_epoch: list[dict] = []
        self.train_seconds = 0.0
        self.saved_mb: float | None = None  # MiB the first step kept for backward (lorazoo.memory)

    # --- planning -----------------------------------------------------------------------------
    def plan(self, batches_per_epoch: int) -> list[tuple[int, int]]:
        """(epoch, number of micro-batches) for each epoch or final partial epoch."""
        if batches_per_epoch < 1:
            raise LorazooError("the task produced no training batches; raise limit or lower batch_size")
        full, part = int(self.epochs), self.epochs - int(self.epochs)
        plan = [(e, batches_per_epoch) for e in range(full)]
        if part > 0:
            plan.append((full, max(1, round(part * batches_per_epoch))))
        return plan

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps in the whole run (a step never spans two epochs)."""
        return sum(math.ceil(n / self.accumulation) for _, n in self.plan(batches_per_epoch))

    def warmup_steps(self, total: int) -> int:
        return int(round(self.warmup * total)) if self.warmup < 1 else int(self.warmup)

    # --- the loop -----------------------------------------------------------------------------
    def fit(self, batches: Sequence[dict] | Callable[[int], Sequence[dict]], resume=False) -> dict:
        """Train. ``batches`` is a list of batch dicts, or ``epoch -> list`` (reshuffled each epoch).

        ``resume``: True continues from the newest checkpoint in ``checkpoint_dir`` (from the start
        when there is none yet); a folder continues from that checkpoint (or the newest one in it).
        Returns ``{"losses", "lrs", "metrics_per_epoch", "train_seconds", "steps", "saved_mb"}``;
        evaluation time is not counted in ``train_seconds``; ``saved_mb`` is what the first step run
        kept for backward (:func:`lorazoo.memory.count_saved`; None when no step ran).
        """
        get = batches if callable(batches) else (lambda epoch: batches)
        first = list(get(0))
        plan = self.plan(len(first))
        total = sum(math.ceil(n / self.accumulation) for _, n in plan)
        warm = self.warmup_steps(total)
        self.handle.plan(total)  # schedules sized by the run (AdaLoRA's budget)
        position, rng = (0, 0), None
        folder = self._resume_folder(resume)
        if folder is not None:
            position, rng = self._restore(folder, plan, total, len(first))
        self._saved_step = self.step if folder is not None else None
        bar = _progress_bar(total, self.progress and self._main())
        bar.update(self.step if folder is not None else 0)
        try:
            for i, (epoch, n) in enumerate(plan):
                if i < position[0]:
                    continue
                start0 = position[1] if i == position[0] else 0
                if rng is not None and start0 == 0:  # resumed at an epoch boundary: its data comes next
                    ckpt.set_rng_state(*rng)
                    rng = None
                epoch_batches = first if epoch == 0 else list(get(epoch))
                if rng is not None:  # resumed mid-epoch: the epoch's data was drawn before the checkpoint
                    ckpt.set_rng_state(*rng)
                    rng = None
                if len(epoch_batches) < n:
                    raise LorazooError(f"epoch {epoch} has {len(epoch_batches)} batches, expected {n}")
                for start in range(start0, n, self.accumulation):
                    group = epoch_batches[start:min(n, start + self.accumulation)]
                    t0 = time.perf_counter()
                    if self.saved_mb is None:  # the first step: what it keeps for backward (lorazoo.memory)
                        with count_saved(self.model) as saved:
                            loss = self._step(group, total, warm)
                        self.saved_mb = saved.mb
                    else:
                        loss = self._step(group, total, warm)
                    self.train_seconds += time.perf_counter() - t0
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
                    if start + self.accumulation < n:
                        self._maybe_checkpoint((i, start + self.accumulation), total, len(first))
                if self.evaluate is not None:
                    metrics = self._evaluate()
                    self.metrics_per_epoch.append({"epoch": round(epoch + n / len(first), 4), **metrics})
                    if self.progress and self._main():
                        bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()),
                                  file=sys.stderr)
                self._maybe_checkpoint((i + 1, 0), total, len(first))
            if rng is not None:  # resumed from the final checkpoint: nothing was left to do
                ckpt.set_rng_state(*rng)
            if self.checkpoint_every is not None and self._saved_step != self.step:
                self._save_checkpoint((len(plan), 0), total, len(first))  # the finished run
        finally:
            bar.close()
            self.model.eval()
        return {"losses": self.losses, "lrs": self.lrs, "metrics_per_epoch": self.metrics_per_epoch,
                "train_seconds": self.train_seconds, "steps": self.step, "saved_mb": self.saved_mb}

    def _step(self, group: list[dict], total: int, warm: int) -> float:
        handle, opt = self.handle, self.optimizer
        step = self.step + 1
        factor = schedule_factor(step, total, warm, self.lr_schedule) * handle.lr_factor(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.net.train()
        rng_before = ckpt.torch_rng_state()  # to replay the step if it goes non-finite
        sizes = [batch_size_of(b) for b in group]
        n_total = sum(sizes)
        if self.world > 1:  # this rank's rows of each global batch
            group, sizes = map(list, zip(*(launch.shard_batch(b, n) for b, n in zip(group, sizes))))
        step_loss = 0.0
        for j, (batch, size) in enumerate(zip(group, sizes)):
            last = j == len(group) - 1
            with self.net.no_sync() if self.world > 1 and not last else _nothing():
                loss = self.net(**batch).loss
                if loss is None:
                    raise LorazooError("the model returned no loss; training batches must carry labels")
                weight = size / n_total
                # DDP averages the ranks' gradients: world * weight makes it their weighted sum
                ((loss + handle.aux_loss()) * (weight * self.world)).backward()
            step_loss += loss.item() * weight
        if self.world > 1:  # the global batch's loss: the ranks' weighted shares summed
            step_loss = launch.all_reduce_sum(step_loss)
        params = handle.trainable_parameters()
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        else:
            norm = grad_norm(params)
        if not (math.isfinite(step_loss) and math.isfinite(norm)):
            raise self._non_finite(group, sizes, step, step_loss, norm, rng_before)
        handle.before_step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        handle.after_step(opt, step)
        self.step = step
        self.losses.append(step_loss)
        self.lrs.append(opt.param_groups[0]["lr"])
        return step_loss

    def _main(self) -> bool:
        """Whether this process evaluates, writes and prints: rank 0 of the trainer's DDP group."""
        return self.world == 1 or launch.is_main_process()

    def _evaluate(self) -> dict:
        metrics = None
        if self._main():  # under torch.distributed: rank 0 evaluates, every rank gets it
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    metrics = dict(self.evaluate(self.model))
            finally:
                self.model.train(was_training)
        return launch.broadcast_object(metrics) if self.world > 1 else metrics

    # --- checkpoints --------------------------------------------------------------------------
    def _options(self) -> dict:
        """The options a resumed run must share with the run that wrote the checkpoint."""
        return {"lr": self.lr, "epochs": self.epochs, "accumulation": self.accumulation,
                "lr_schedule": self.lr_schedule, "warmup": self.warmup, "weight_decay": self.weight_decay,
                "max_grad_norm": self.max_grad_norm}

    def _maybe_checkpoint(self, position: tuple[int, int], total: int, per_epoch: int) -> None:
        if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0 \
                and self._saved_step != self.step:
            self._save_checkpoint(position, total, per_epoch)

    def _save_checkpoint(self, position, total, per_epoch) -> Path:
        bad = non_finite_parameters(self.handle)
        if bad:
            raise NonFiniteError(
                f"after step {self.step} the adapter's parameters {', '.join(bad[:3])} are not finite (an update "
                f"overflowed); lower the learning rate. {self._kept()}",
                step=self.step, layer=_layer_of(self.handle, bad[0]), checkpoint=self.last_checkpoint)
        tensors: dict[str, torch.Tensor] = {}
        opt_t, opt_j = ckpt.optimizer_state(self.optimizer)
        sch_t, sch_j = ckpt.part_state("schedule", self.handle.schedule)
        optim_t, optim_j = ckpt.part_state("optim", self.handle.optim)
        rng_t, rng_j = ckpt.rng_state()
        for t in (opt_t, sch_t, optim_t, rng_t):
            tensors.update(t)
        state = {"step": self.step, "position": list(position),
                 "total_steps": total, "batches_per_epoch": per_epoch, "options": self._options(),
                 "losses": self.losses, "lrs": self.lrs, "metrics_per_epoch": self.metrics_per_epoch,
                 "train_seconds": self.train_seconds, "optimizer": opt_j, "schedule": sch_j, "optim": optim_j,
                 "rng": rng_j, "extra": self.extra}
        written = None
        if self._main():  # under torch.distributed rank 0 writes, the others wait for it
            written = ckpt.write_checkpoint(self.checkpoint_dir, self.step, self.handle, tensors, state,
                                            keep=self.keep_checkpoints)
        if self.world > 1:
            written = Path(launch.broadcast_object(str(written) if written is not None else None))
        self.last_checkpoint = written
        self._saved_step = self.step
        return self.last_checkpoint

    def _resume_folder(self, resume) -> Path | None:
        if resume is False or resume is None:
            return None
        if resume is True:
            if self.checkpoint_dir is None:
                raise LorazooError("fit(resume=True) needs checkpoint_dir, the folder the checkpoints are in")
            return ckpt.latest_checkpoint(self.checkpoint_dir)
        folder = Path(resume)
        if (folder / ckpt.STATE_JSON).is_file():
            return folder
        found = ckpt.latest_checkpoint(folder)
        if found is None:
            raise LoadError(f"{str(folder)!r} holds no training checkpoint")
        return found

    def _restore(self, folder: Path, plan, total: int, per_epoch: int):
        """Load the checkpoint in ``folder``; (data position, RNG state to set when data is drawn)."""
        tensors, state = ckpt.read_checkpoint(folder)
        saved = state.get("options", {})
        for k, now in self._options().items():
            if saved.get(k) != now:
                raise LorazooError(f"the checkpoint {folder} was written with {k}={saved.get(k)!r}, this trainer "
                                   f"has {k}={now!r}; resume with the options the run started with")
        if (state.get("total_steps"), state.get("batches_per_epoch")) != (total, per_epoch):
            raise LorazooError(
                f"the checkpoint {folder} is from a run of {state.get('total_steps')} steps over "
                f"{state.get('batches_per_epoch')} batches an epoch, this one has {total} over {per_epoch}: "
                f"resume on the same data and batch size")
        position = state.get("position")
        if not (isinstance(position, list) and len(position) == 2 and all(isinstance(v, int) for v in position)):
            raise LoadError(f"the checkpoint {folder} has no valid data position; it is damaged")
        i, start = position
        done = sum(math.ceil(n / self.accumulation) for _, n in plan[:i]) + math.ceil(start / self.accumulation)
        if done != state["step"]:
            raise LoadError(f"the checkpoint {folder} is inconsistent: step {state['step']} at data position "
                            f"{position}")
        ckpt.restore_adapter(self.handle, folder)
        ckpt.load_optimizer_state(self.optimizer, tensors, state.get("optimizer", {}))
        ckpt.load_part_state("schedule", self.handle.schedule, tensors, state.get("schedule", {}))
        ckpt.load_part_state("optim", self.handle.optim, tensors, state.get("optim", {}))
        self.step = int(state["step"])
        self.losses, self.lrs = list(state.get("losses", [])), list(state.get("lrs", []))
        self.metrics_per_epoch = list(state.get("metrics_per_epoch", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.last_checkpoint = self.resumed_from = folder
        return (i, start), (tensors, state.get("rng", {}))

    # --- non-finite values --------------------------------------------------------------------
    def _kept(self) -> str:
        if self.last_checkpoint is None:
            hint = " (set checkpoint_dir and checkpoint_every to keep one)" if self.checkpoint_every is None else ""
            return f"No checkpoint was written before it{hint}."
        return (f"The last good checkpoint, {self.last_checkpoint} (step {self._saved_step}), is kept; "
                f"resume from it with fit(resume=...) or `lorazoo train --resume`.")

    def _non_finite(self, group, sizes, step, step_loss, norm, rng_before) -> NonFiniteError:
        """Replay the step's micro-batches with hooks on the adapted layers; the error naming the
        first one (in forward order) whose output went non-finite."""
        found = locate_non_finite(self.model, self.handle, group, sizes, rng_before)
        layer, where = found
        what = (f"the loss is {step_loss:g}" if not math.isfinite(step_loss)
                else f"the loss is {step_loss:.4g} but the gradient norm is {norm:g}")
        where = where[:1].upper() + where[1:]
        return NonFiniteError(f"training stopped at step {step}: {what}. {where}; lower the learning rate or check "
                              f"the data. {self._kept()}", step=step, layer=layer, checkpoint=self.last_checkpoint)


def grad_norm(params) -> float:
    """The total 2-norm of the parameters' gradients (what clipping measures)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(grads[0].device)
                                                       for g in grads])))


def non_finite_parameters(handle: AdapterHandle) -> list[str]:
    """Names of the adapter's tensors holding NaN or infinity."""
    return [k for k, v in handle.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


def _layer_of(handle: AdapterHandle, tensor_name: str) -> str | None:
    """The adapted layer a tensor of ``handle.state_dict()`` belongs to (None: a saved module's)."""
    paths = [p for p in handle.layers() if tensor_name.startswith(p + ".")]
    return max(paths, key=len) if paths else None


def locate_non_finite(model: nn.Module, handle: AdapterHandle, group, sizes, rng_state) -> tuple[str | None, str]:
    """Re-run ``group`` (RNG as at the step's start) with forward hooks on the adapter's layers;
    (first layer to go non-finite or None, a sentence saying where)."""
    layers = handle.layers()
    forward: list[tuple[str, bool, bool]] = []   # (path, input finite, output finite) in call order
    backward: list[tuple[str, bool]] = []        # (path, gradient of output finite) in backward order

    def hook_for(path):
        def hook(module, args, out):
            x = args[0] if args and torch.is_tensor(args[0]) else None
            if not torch.is_tensor(out):
                return
            with torch.no_grad():
                forward.append((path, x is None or bool(torch.isfinite(x).all()), bool(torch.isfinite(out).all())))
            if out.requires_grad:
                out.register_hook(lambda g: backward.append((path, bool(torch.isfinite(g).all()))))
        return hook

    handles = [layer.register_forward_hook(hook_for(path)) for path, layer in layers.items()]
    model.zero_grad(set_to_none=True)
    for p in handle.trainable_parameters():
        p.grad = None
    failed = None
    try:
        ckpt.set_torch_rng_state(rng_state)
        model.train()
        n_total = sum(sizes)
        for batch, size in zip(group, sizes):
            loss = model(**batch).loss
            total = (loss + handle.aux_loss()) * (size / n_total)
            if total.requires_grad:
                total.backward()
    except Exception as e:  # the replay itself failed: report what was seen so far
        failed = f"{type(e).__name__}: {e}"
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(p for p, _, _ in forward))
    for path, x_ok, y_ok in forward:
        if not y_ok:
            cause = "its input was already non-finite (the data, or the layers before it)" if not x_ok else \
                "its input was finite"
            return path, (f"the first adapted layer (in forward order) whose output went non-finite is {path!r}: "
                          f"{cause}")
    for path, ok in backward:
        if not ok:
            return path, (f"every adapted layer's output was finite; the gradient went non-finite first (in "
                          f"backward order) at the output of {path!r}, in the layers after it or the loss")
    for path in order:
        ad = layers[path].adapters[handle.name]
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in ad.parameters()):
            return path, (f"the first adapted layer (in forward order) whose gradient went non-finite is {path!r}: "
                          f"its parameters' gradients, though its output and the gradient reaching it were finite")
    others = [n for n, p in handle.named_trainable_parameters()
              if p.grad is not None and not torch.isfinite(p.grad).all()]
    if others:
        return None, f"every adapted layer stayed finite; the gradients of {', '.join(others[:3])} went non-finite"
    if forward and all(y for _, _, y in forward):
        note = f" (the replay failed: {failed})" if failed else ""
        return None, (f"every adapted layer's output and gradient was finite ({', '.join(order[:6])}"
                      f"{', ...' if len(order) > 6 else ''}): the loss went non-finite after them (the layers that "
                      f"follow, the head, or the loss itself){note}")
    return None, ("the non-finite value did not come back when the step was replayed"
                  + (f" (the replay failed: {failed})" if failed else ""))


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True, leave=False)
