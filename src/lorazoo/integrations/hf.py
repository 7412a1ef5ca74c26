"""Train any lorazoo adapter with the Hugging Face ``transformers.Trainer`` (and ``accelerate launch``).

::

    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("adalora"))
    trainer = LorazooTrainer(model=model, args=TrainingArguments(...), train_dataset=..., data_collator=...)
    trainer.train()
    trainer.save_model(out)            # a lorazoo adapter: lorazoo.load(fresh_model, out)

``LorazooTrainer`` is ``transformers.Trainer`` with :class:`LorazooTrainerMixin` (put the mixin first
to combine it with another Trainer subclass, e.g. TRL's ``SFTTrainer``). It runs one optimizer step
in the order :mod:`lorazoo.train` does (checked against it in ``tests/test_hf_trainer.py``)::

    Trainer                         lorazoo hook (through LorazooCallback and the mixin)
    create_optimizer                torch/HF optimizer of args.optim over handle.param_groups(lr, wd) (LoRA+)
    create_scheduler(total)         handle.plan(total) (AdaLoRA's budget, ReLoRA's phase); lr of each group
                                    = its base lr x schedule x handle.lr_factor(step) (ReLoRA's jagged lr)
    compute_loss (per micro-batch)  task loss + handle.aux_loss() (routers' balancing, AdaLoRA's orth. reg.)
    clip_grad_norm_
    on_pre_optimizer_step           handle.before_step(optimizer) (AdaLoRA's sensitivities, LoRA-Pro)
    optimizer.step; scheduler.step; zero_grad; global_step += 1
    on_step_end                     handle.after_step(optimizer, global_step) (AdaLoRA masks, ReLoRA merges
                                    and optimizer pruning); then HF logs and saves
    save_model / checkpoints        the adapter in lorazoo's format (handle.save), not the whole model;
                                    checkpoints add the schedule/optim parts' state (lorazoo_state.safetensors)
                                    and resume_from_checkpoint restores both (adapter, base shifts, masks)

Choices:

- The schedule: ``lr_schedule=None`` (default) keeps the one ``TrainingArguments`` names
  (``lr_scheduler_type``, ``warmup_steps``), times ``handle.lr_factor``; ``"linear"``, ``"cosine"``
  or ``"constant"`` use lorazoo's :func:`lorazoo.train.schedule_factor` instead (HF's linear warmup
  starts at lr 0 and decays to 0; lorazoo's starts at 1/warmup and ends at 1/(total - warmup)), with
  ``args.get_warmup_steps(total)`` warmup steps. A scheduler that is not a ``LambdaLR`` (plateau)
  cannot carry ReLoRA's factor and is refused for such a schedule.
- Weight decay follows ``handle.param_groups`` (lorazoo's rule), not HF's no-decay list for biases
  and norms. Every parameter that requires a gradient must belong to the adapter (train extra
  modules through the spec's ``modules_to_save``), as lorazoo's own trainer trains only the adapter.
- The auxiliary loss gets the weight HF gives the task loss of a micro-batch (1 / accumulation
  steps, summing to 1 per step). lorazoo's trainer weights micro-batches by their share of the step's
  examples, which is the same when they have equal sizes. Its mean per step is logged as
  ``aux_loss`` beside HF's ``loss`` (which includes it).
- The gradients ``before_step`` sees are clipped (and unscaled under fp16), as in lorazoo's trainer.
- Not supported (refused at construction): DeepSpeed and FSDP (they shard the adapter's tensors, so
  ``handle.save`` and the hooks would see shards) and ``torch.nn.DataParallel`` (``n_gpu > 1`` in
  one process: the forms' auxiliary losses live on the replicas); use ``accelerate launch`` or
  ``torchrun`` (DDP), which run the hooks on every process on identical gradients.

Tested with transformers 5.23 and accelerate 1.15.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from .. import checkpoint as ckpt
from ..errors import LoadError, LorazooError
from ..handle import AdapterHandle, handles_of
from ..train import LR_SCHEDULES, schedule_factor

STATE_FILE = "lorazoo_state.safetensors"  # the schedule and optim parts' state in an HF checkpoint
TRAINING_ARGS_NAME = "training_args.bin"  # what HF's Trainer saves beside a model

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # transformers < 4.47
    raise ImportError("lorazoo.integrations.hf needs a transformers whose TrainerCallback has on_pre_optimizer_step "
                      "(4.47 or newer; tested with 5.23)")


def find_handle(model: torch.nn.Module, handle: AdapterHandle | None = None) -> AdapterHandle:
    """``handle``, or the one lorazoo adapter on ``model``; LorazooError when that is ambiguous."""
    if handle is not None:
        if not isinstance(handle, AdapterHandle):
            raise LorazooError(f"handle must be a lorazoo AdapterHandle, got {type(handle).__name__}")
        return handle
    found = handles_of(model) if isinstance(model, torch.nn.Module) else {}
    if len(found) != 1:
        raise LorazooError(f"the model carries {len(found)} lorazoo adapters ({', '.join(found) or 'none'}); "
                           f"pass the one to train as handle=... (adapt the model first with lorazoo.adapt)")
    return next(iter(found.values()))


def lr_lambda(handle: AdapterHandle, schedule):
    """``LambdaLR`` multiplier for its 0-based step counter ``s``: ``schedule(s)`` times
    ``handle.lr_factor(s + 1)`` (lorazoo numbers steps from 1). A closure, so ``LambdaLR.state_dict``
    stores none of it (it saves the ``__dict__`` of callable objects)."""
    def factor(s: int) -> float:
        return schedule(s) * handle.lr_factor(s + 1)
    return factor


def has_lr_factor(handle: AdapterHandle) -> bool:
    """Whether the adapter's schedule changes the learning rate (ReLoRA)."""
    from ..parts import Schedule

    return type(handle.schedule).lr_factor is not Schedule.lr_factor


def save_part_state(handle: AdapterHandle, folder) -> None:
    """Write the schedule and optim parts' training state into ``folder``/STATE_FILE (tensors, with
    the rest as JSON in the header), through a temporary file."""
    tensors, other = {}, {}
    for prefix, part in (("schedule", handle.schedule), ("optim", handle.optim)):
        t, o = ckpt.part_state(prefix, part)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in t.items()})
        other[prefix] = o
    path = os.path.join(folder, STATE_FILE)
    save_file(tensors, path + ".tmp", metadata={"format": "pt", "lorazoo_state": json.dumps(other)})
    os.replace(path + ".tmp", path)


def load_part_state(handle: AdapterHandle, folder) -> None:
    """Restore what :func:`save_part_state` wrote; LoadError when a part with state finds none."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        if handle.schedule.state_dict() or handle.optim.state_dict():
            raise LoadError(f"the checkpoint {folder} holds no {STATE_FILE}, the training state of schedule "
                            f"{handle.spec.schedule!r} / optim {handle.spec.optim!r}; it was not written by "
                            f"LorazooTrainer, or is incomplete")
        return
    device = next(iter(handle.trainable_parameters()), torch.zeros(())).device  # where the parts compute
    try:
        with safe_open(path, framework="pt") as f:
            other = json.loads((f.metadata() or {}).get("lorazoo_state", "{}"))
            tensors = {k: f.get_tensor(k).to(device) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any damage reads the same to the user
        raise LoadError(f"{path} is damaged ({str(e)[:200]})") from None
    ckpt.load_part_state("schedule", handle.schedule, tensors, other.get("schedule", {}))
    ckpt.load_part_state("optim", handle.optim, tensors, other.get("optim", {}))


class LorazooCallback(TrainerCallback):
    """The adapter's step hooks in a Trainer's loop: ``handle.plan`` at the start (unless
    :meth:`plan` was called for this length already), ``handle.before_step`` between gradient
    clipping and ``optimizer.step()``, ``handle.after_step`` once the step is done.

    ``LorazooTrainer`` installs it; with another Trainer, add it yourself and build the optimizer
    from ``handle.param_groups`` and the scheduler with :func:`lr_lambda`.
    """

    def __init__(self, handle: AdapterHandle):
        self.handle = handle
        self.planned: int | None = None

    def plan(self, total_steps: int) -> None:
        if self.planned != total_steps:
            self.handle.plan(total_steps)
            self.planned = int(total_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self.plan(state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.handle.before_step(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.handle.after_step(optimizer, state.global_step)


class LorazooTrainerMixin:
    """What ``transformers.Trainer`` needs to train a lorazoo adapter (see the module docstring).

    ``handle``: the adapter to train (default: the only one on the model). ``lr_schedule``: None
    keeps ``args.lr_scheduler_type``; "linear", "cosine" or "constant" use lorazoo's schedule.
    """

    def __init__(self, *args, handle: AdapterHandle | None = None, lr_schedule: str | None = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if kwargs.get("model_init") is not None:
            raise LorazooError("LorazooTrainer trains the adapter already on model=...; model_init (a new model "
                               "per train() or hyperparameter trial) is not supported")
        self.lorazoo_handle = find_handle(model, handle)
        if self.lorazoo_handle.model is not model:
            raise LorazooError(f"the adapter {self.lorazoo_handle.name!r} is on another model than model=...")
        if lr_schedule is not None and lr_schedule not in LR_SCHEDULES:
            raise LorazooError(f"unknown lr_schedule {lr_schedule!r}; known: None (the TrainingArguments' "
                               f"lr_scheduler_type), {', '.join(LR_SCHEDULES)}")
        self.lorazoo_lr_schedule = lr_schedule
        self._lorazoo_aux: torch.Tensor | None = None  # aux loss summed since the last log
        self._lorazoo_aux_since = 0
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise LorazooError("LorazooTrainer does not support DeepSpeed or FSDP yet: they shard the adapter's "
                               "tensors; use DDP (accelerate launch / torchrun without a DeepSpeed or FSDP config)")
        if self.args.n_gpu > 1:
            raise LorazooError(f"{self.args.n_gpu} GPUs in one process (torch DataParallel) are not supported: the "
                               f"adapter's auxiliary losses live on the replicas; launch one process per GPU with "
                               f"accelerate launch or torchrun, or set CUDA_VISIBLE_DEVICES to one GPU")
        self.lorazoo_callback = LorazooCallback(self.lorazoo_handle)
        self.add_callback(self.lorazoo_callback)

    # --- optimizer and schedule ---------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        from transformers.trainer_optimizer import is_optimizer_factory

        opt_model = self.model if model is None else model
        handle = self.lorazoo_handle
        own = {id(p) for p in handle.trainable_parameters()}
        stray = [n for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in own]
        if stray:
            raise LorazooError(
                f"{len(stray)} parameters outside the adapter {handle.name!r} require gradients ({', '.join(stray[:3])}"
                f"{', ...' if len(stray) > 3 else ''}); train modules in full through the spec's modules_to_save, "
                f"or freeze them")
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
            raise LorazooError(f"optim {self.args.optim!r} builds its own parameter groups, so the adapter's "
                               f"(LoRA+'s rates) cannot be given to it; use an optimizer such as adamw_torch")
        self.optimizer = cls(handle.param_groups(self.args.learning_rate, self.args.weight_decay), **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        self.lorazoo_callback.plan(num_training_steps)  # before the schedule: ReLoRA's phase needs it
        self._lorazoo_aux = None
        if self.lr_scheduler is not None:
            if has_lr_factor(self.lorazoo_handle):
                warnings.warn("the Trainer was given its own lr scheduler, so the adapter's lr_factor "
                              "(ReLoRA's jagged schedule) is not applied; build it with "
                              "lorazoo.integrations.hf.lr_lambda", stacklevel=2)
            return self.lr_scheduler
        optimizer = self.optimizer if optimizer is None else optimizer
        handle, kind = self.lorazoo_handle, self.lorazoo_lr_schedule
        if kind is not None:
            total, warm = num_training_steps, self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = LambdaLR(optimizer, lr_lambda(
                handle, lambda s: schedule_factor(s + 1, total, warm, kind)))
        else:
            sched = super().create_scheduler(num_training_steps, optimizer)
            if has_lr_factor(handle):
                if not isinstance(sched, LambdaLR):
                    raise LorazooError(
                        f"schedule {handle.spec.schedule!r} scales the learning rate each step (lr_factor), which "
                        f"lr_scheduler_type={str(self.args.lr_scheduler_type)!r} ({type(sched).__name__}) cannot "
                        f"carry; use a LambdaLR schedule (linear, cosine, constant, ...) or lr_schedule='linear'")
                # a new LambdaLR keeps each group's initial_lr (setdefault) and recomputes lr from it
                self.lr_scheduler = LambdaLR(optimizer, [lr_lambda(handle, f) for f in sched.lr_lambdas])
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # --- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:  # evaluation reports the task loss alone
            return out
        loss, outputs = out if return_outputs else (out, None)
        aux = self.lorazoo_handle.aux_loss()
        if aux.requires_grad:
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:  # as Trainer.training_step decides whether it divides by the accumulation
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            share = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            # the trainer divides an unscaled micro-batch loss by the accumulation steps itself
            loss = loss + (aux * share if scaled else aux).to(loss.device)
            if self._lorazoo_aux is None:
                self._lorazoo_aux = torch.zeros((), device=self.args.device)
                self._lorazoo_aux_since = self.state.global_step
            self._lorazoo_aux += aux.detach().to(self._lorazoo_aux.device) * share
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._lorazoo_aux is not None and "loss" in logs and "learning_rate" in logs:
            from transformers.trainer_pt_utils import nested_gather

            total = nested_gather(self._lorazoo_aux, self.args.parallel_mode).mean().item()
            logs["aux_loss"] = total / max(1, self.state.global_step - self._lorazoo_aux_since)
            self._lorazoo_aux.zero_()
            self._lorazoo_aux_since = self.state.global_step
        return super().log(logs, *args, **kwargs)

    # --- saving and resuming ------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The adapter in lorazoo's format (``adapter.safetensors`` + ``adapter_config.json``), the
        tokenizer/processor and the training arguments, as HF saves beside a model."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.lorazoo_handle.save(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_part_state(self.lorazoo_handle, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        ckpt.restore_adapter(self.lorazoo_handle, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:  # after create_scheduler's plan(): the restored state wins
            load_part_state(self.lorazoo_handle, checkpoint)

    def _load_best_model(self) -> None:
        ckpt.restore_adapter(self.lorazoo_handle, self.state.best_model_checkpoint)


class LorazooTrainer(LorazooTrainerMixin, Trainer):
    """``transformers.Trainer`` for a model carrying a lorazoo adapter (see the module docstring)."""
