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
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import LorazooError
from .handle import AdapterHandle
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


def check_trainer_options(*, lr: float, epochs: float = 1, accumulation: int = 1,
                          lr_schedule: str = "linear", warmup: float = 0.1, weight_decay: float = 0.0,
                          max_grad_norm: float | None = 1.0) -> None:
    """Raise a LorazooError (SpecError) naming the first bad training option."""
    check_number("lr", lr, strict=True)
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
    """

    def __init__(self, model: nn.Module, handle: AdapterHandle, *, lr: float, epochs: float = 1,
                 accumulation: int = 1, lr_schedule: str = "linear", warmup: float = 0.1,
                 weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, progress: bool = True,
                 evaluate: Callable[[nn.Module], dict] | None = None):
        check_trainer_options(lr=lr, epochs=epochs, accumulation=accumulation, lr_schedule=lr_schedule,
                              warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        self.model, self.handle = model, handle
        self.lr, self.epochs, self.accumulation = float(lr), float(epochs), int(accumulation)
        self.lr_schedule, self.warmup, self.weight_decay = lr_schedule, warmup, float(weight_decay)
        self.max_grad_norm, self.progress, self.evaluate = max_grad_norm, progress, evaluate
        self.optimizer = torch.optim.AdamW(handle.param_groups(self.lr, self.weight_decay))
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        self.step = 0
        self.losses: list[float] = []       # mean task loss per optimizer step
        self.lrs: list[float] = []          # the first group's learning rate per step
        self.metrics_per_epoch: list[dict] = []
        self.train_seconds = 0.0

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
    def fit(self, batches: Sequence[dict] | Callable[[int], Sequence[dict]]) -> dict:
        """Train. ``batches`` is a list of batch dicts, or ``epoch -> list`` (reshuffled each epoch).

        Returns ``{"losses", "lrs", "metrics_per_epoch", "train_seconds", "steps"}``; evaluation
        time is not counted in ``train_seconds``.
        """
        get = batches if callable(batches) else (lambda epoch: batches)
        first = list(get(0))
        plan = self.plan(len(first))
        total = sum(math.ceil(n / self.accumulation) for _, n in plan)
        warm = self.warmup_steps(total)
        self.handle.plan(total)  # schedules sized by the run (AdaLoRA's budget)
        bar = _progress_bar(total, self.progress)
        try:
            for epoch, n in plan:
                epoch_batches = first if epoch == 0 else list(get(epoch))
                if len(epoch_batches) < n:
                    raise LorazooError(f"epoch {epoch} has {len(epoch_batches)} batches, expected {n}")
                for start in range(0, n, self.accumulation):
                    group = epoch_batches[start:min(n, start + self.accumulation)]
                    t0 = time.perf_counter()
                    loss = self._step(group, total, warm)
                    self.train_seconds += time.perf_counter() - t0
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
                if self.evaluate is not None:
                    metrics = self._evaluate()
                    self.metrics_per_epoch.append({"epoch": round(epoch + n / len(first), 4), **metrics})
                    if self.progress:
                        bar.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()),
                                  file=sys.stderr)
        finally:
            bar.close()
            self.model.eval()
        return {"losses": self.losses, "lrs": self.lrs, "metrics_per_epoch": self.metrics_per_epoch,
                "train_seconds": self.train_seconds, "steps": self.step}

    def _step(self, group: list[dict], total: int, warm: int) -> float:
        model, handle, opt = self.model, self.handle, self.optimizer
        step = self.step + 1
        factor = schedule_factor(step, total, warm, self.lr_schedule) * handle.lr_factor(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        model.train()
        sizes = [batch_size_of(b) for b in group]
        n_total = sum(sizes)
        step_loss = 0.0
        for batch, size in zip(group, sizes):
            loss = model(**batch).loss
            if loss is None:
                raise LorazooError("the model returned no loss; training batches must carry labels")
            weight = size / n_total
            ((loss + handle.aux_loss()) * weight).backward()
            step_loss += loss.item() * weight
        if not math.isfinite(step_loss):
            raise LorazooError(f"training loss became {step_loss} at step {step}; lower the learning rate")
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(handle.trainable_parameters(), self.max_grad_norm)
        handle.before_step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        handle.after_step(opt, step)
        self.step = step
        self.losses.append(step_loss)
        self.lrs.append(opt.param_groups[0]["lr"])
        return step_loss

    def _evaluate(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return dict(self.evaluate(self.model))
        finally:
            self.model.train(was_training)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True, leave=False)
