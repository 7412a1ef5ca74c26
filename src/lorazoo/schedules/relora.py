"""ReLoRA (Lialin et al., 2024 [21]; study Eq. 12-13): merge-and-reinit, optimizer reset, jagged LR.

Training runs in phases of T steps: ``relora_interval`` is a count, or below 1 a fraction of the
run (default 0.25: four phases, the paper's 5k-step cycles in a 20k-step run), resolved by
``handle.plan(total_steps)``, which lorazoo's trainer calls. After step τT (1-based, τ = 1, 2, ...)
the update is merged into the frozen base, W_{t_τ} = W_{t_{τ-1}} + s·B·A (Eq. 12, through
``adapter.shift_base`` so save/load/delete reproduce and undo it), the factors are re-initialized
by the form's ``reset_parameters`` (B = 0: the model output is unchanged), and the optimizer state
of the adapter's parameters is pruned by magnitude (p = ``relora_prune``, 0.99 as the paper): the
round(p·n) entries of smallest second moment (Adam's ``exp_avg_sq``) are zeroed in both moments,
one mask for the two (ties at the threshold go too); an optimizer without a second moment has
each state tensor shaped like its parameter pruned by its own magnitude. Departure: the official
code prunes the two moments by separate masks, which keeps some first moments whose second moment
is zeroed; the next Adam step divides them by sqrt(v) ≈ 0 (A's gradient is 0 right after a reset,
B being 0) and the tiny-net run jumps from loss 0.5 to 2-5 at lr 2e-3-5e-3 in 4 of 5 seeds. p = 1 is a full reset: the
parameter's state is dropped, so the optimizer starts it afresh (Adam's step count too).

Jagged cosine learning rate, ``lr_factor(t)`` for the 1-based step t (W0 = ``relora_warmup``,
Wr = ``relora_restart_warmup``, a count or below 1 a fraction of T (default 0.1), N = ``relora_total_steps``, ρ = ``relora_min_lr_ratio``):

    c(t) = ρ + (1 − ρ)·½(1 + cos(π·clip((t − W0)/(N − W0), 0, 1)))    (c ≡ 1 when N = 0)
    t ≤ W0:                         t / W0                 (first warmup)
    k = ⌊(t−1)/T⌋ ≥ 1, j = t − kT ≤ Wr:  (j / Wr)·c(kT + Wr)   (re-warmup after the k-th reset)
    otherwise:                       c(t)

As the official schedule: one cosine decay over the run with a short linear re-warmup after each
reset. Deviations, for a continuous curve with no wasted step: warmups ramp j/W for j = 1..W (the
official ramps from 0 at the reset step), and a re-warmup ends on the cosine value where it ends
(the official aims at the value at the reset step). N = 0 (the length of the run is unknown) keeps
the warmups and drops the decay. The study re-warms for 10 steps (Sec. V settings).
"""
from __future__ import annotations

import math

import torch

from ..distributed import like, reset_whole, whole
from ..errors import LorazooError, SpecError
from ..parts import Form, Schedule, check_number
from ..registry import SCHEDULES


@torch.no_grad()
def magnitude_keep_mask(t: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 where ``t`` is not among its round(fraction·numel) entries of smallest magnitude (ties at
    the threshold go too), 0 elsewhere."""
    k = round(fraction * t.numel())
    if k == 0:
        return torch.ones_like(t)
    threshold = t.abs().flatten().kthvalue(k).values
    return (t.abs() > threshold).to(t.dtype)


def rewarm_steps(interval: int, rewarm: float, what: str = "") -> int:
    """Wr in steps (a fraction below 1 is of the interval); SpecError when no step follows it."""
    rewarm = round(rewarm * interval) if rewarm < 1 else int(rewarm)
    if rewarm >= interval:
        raise SpecError(
            f"relora_restart_warmup ({rewarm}) must be shorter than the merge interval of {interval} steps"
            f"{what}; lower relora_restart_warmup or merge less often")
    return rewarm


@SCHEDULES.register("relora", paper="ReLoRA (Lialin et al., 2024) [21]",
                    equations="study Eq. 12-13; W_{t_τ} = W_{t_{τ-1}} + s·B·A every T steps, then reinit, "
                              "optimizer pruning, jagged cosine LR",
                    summary="merge s·B·A into the base every relora_interval steps, re-init, reset optimizer, "
                            "re-warm the LR")
class ReLoRA(Schedule):
    options = {"relora_interval": 0.25, "relora_warmup": 0, "relora_restart_warmup": 0.1,
               "relora_total_steps": 0, "relora_min_lr_ratio": 0.1, "relora_prune": 0.99}

    @classmethod
    def validate(cls, opts):
        check_number("relora_interval", opts["relora_interval"], strict=True)
        check_number("relora_restart_warmup", opts["relora_restart_warmup"])
        for key in ("relora_warmup", "relora_total_steps"):
            check_number(key, opts[key], integer=True)
        check_number("relora_min_lr_ratio", opts["relora_min_lr_ratio"], maximum=1.0)
        check_number("relora_prune", opts["relora_prune"], maximum=1.0)
        for key in ("relora_interval", "relora_restart_warmup"):
            if opts[key] >= 1 and opts[key] != int(opts[key]):
                raise SpecError(f"{key} is a step count (an integer) or a fraction below 1, got {opts[key]!r}")
        if opts["relora_interval"] >= 1:
            rewarm_steps(opts["relora_interval"], opts["relora_restart_warmup"])
        if opts["relora_total_steps"] and opts["relora_total_steps"] <= opts["relora_warmup"]:
            raise SpecError(
                f"relora_total_steps ({opts['relora_total_steps']}) must exceed relora_warmup "
                f"({opts['relora_warmup']}); set it to the length of the run, or 0 for no cosine decay"
            )

    @classmethod
    def check_form(cls, form_cls):
        if (form_cls.factors is Form.factors or not form_cls.plain_product or not form_cls.mergeable
                or form_cls.multiplicative
                or form_cls.reads_output or not form_cls.zero_init):
            raise SpecError(
                f"schedule 'relora' merges s·B·A into the base and restarts from a zero update, which needs "
                f"a mergeable additive form with B·A factors and a zero init; form '{form_cls.part_name}' "
                f"is not one: use form='lora', or schedule='none'"
            )

    def __init__(self, spec):
        super().__init__(spec)
        every = spec.options["relora_interval"]
        self.interval = self.rewarm = None  # a fraction of the run waits for plan()
        if every >= 1:
            self.interval = int(every)
            self.rewarm = rewarm_steps(self.interval, spec.options["relora_restart_warmup"])

    def plan(self, total_steps):
        every = self.spec.options["relora_interval"]
        if every < 1:
            self.interval = max(1, round(every * total_steps))
            self.rewarm = rewarm_steps(self.interval, self.spec.options["relora_restart_warmup"],
                                       f" ({every:g} of {total_steps} steps)")

    def phase(self) -> int:
        """T in steps; a fractional relora_interval needs the run's length first."""
        if self.interval is None:
            raise LorazooError(
                f"relora_interval={self.spec.options['relora_interval']} is a fraction of the run: call "
                f"handle.plan(total_steps) before training (lorazoo's trainer does), or give it in steps")
        return self.interval

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self):
        """The phase length T and re-warmup resolved by ``plan``; the phase position is the
        trainer's step, and the merges so far are the adapter's base shift (saved with it)."""
        return {"interval": self.interval, "rewarm": self.rewarm}

    def load_state_dict(self, state):
        if state.get("interval") is not None:
            self.interval, self.rewarm = int(state["interval"]), int(state["rewarm"])

    # --- merge-and-reinit ---------------------------------------------------------------------
    def after_step(self, handle, optimizer, step):
        if step % self.phase() == 0:
            self.merge_and_reinit(handle, optimizer)

    @torch.no_grad()
    def merge_and_reinit(self, handle, optimizer=None) -> None:
        """W0 += s·B·A on every layer, re-init the factors, prune their optimizer state."""
        if handle.merged:
            raise LorazooError(f"adapter {handle.name!r} is merged; unmerge() it before training with ReLoRA")
        layers = handle.layers()
        for path, layer in layers.items():  # check all before changing any
            form = layer.adapters[handle.name].form
            B, A = (whole(t) for t in form.factors())  # under FSDP2 the gathered whole tensors
            delta = whole(form.delta_weight(layer.linear_weight()))
            if not torch.allclose(delta, form.scale * B @ A, rtol=1e-3, atol=1e-3 * delta.abs().max().item()):
                raise LorazooError(f"form '{form.part_name}' at {path!r}: its update is not s·B·A, so ReLoRA "
                                   f"cannot merge it through its factors; use form='lora'")
        # The re-init draws from a generator seeded by the spec's seed and the merges so far, so every
        # process of a distributed run (and a resumed run) re-initializes the same factors.
        merged_rows = next(iter(layers.values())).adapters[handle.name].shift_A.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed * 100_003 + merged_rows + 1)
            for layer in layers.values():
                ad = layer.adapters[handle.name]
                B, A = (whole(t) for t in ad.form.factors())
                ad.shift_base(layer.linear_weight(), ad.form.scale * B, A)  # each rank adds its shard
                reset_whole(ad.form)  # one process's draw, each rank keeps its shard (FSDP2)
        if optimizer is not None:
            for layer in layers.values():
                for p in layer.adapters[handle.name].form.parameters():
                    self.reset_state(optimizer, p)

    def reset_state(self, optimizer, p: torch.Tensor) -> None:
        fraction = self.spec.options["relora_prune"]
        if p not in optimizer.state:
            return
        if fraction >= 1.0:
            del optimizer.state[p]
            return
        # under FSDP2 the states are sharded like p: ranked over the whole tensor, each rank masks its shard
        moments = {k: v for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
        second = moments.get("exp_avg_sq")
        keep = None if second is None else magnitude_keep_mask(whole(second), fraction)
        for v in moments.values():
            v.mul_(like(magnitude_keep_mask(whole(v), fraction) if keep is None else keep, v))

    # --- jagged cosine learning rate ----------------------------------------------------------
    def decay(self, t: float) -> float:
        o = self.spec.options
        total, warm, rho = o["relora_total_steps"], o["relora_warmup"], o["relora_min_lr_ratio"]
        if not total:
            return 1.0
        progress = min(1.0, max(0.0, (t - warm) / (total - warm)))
        return rho + (1 - rho) * 0.5 * (1 + math.cos(math.pi * progress))

    def lr_factor(self, step):
        o = self.spec.options
        T, warm, rewarm = self.phase(), o["relora_warmup"], self.rewarm
        if step <= warm:
            return step / warm
        k, j = (step - 1) // T, (step - 1) % T + 1
        if k >= 1 and j <= rewarm:
            return j / rewarm * self.decay(k * T + rewarm)
        return self.decay(step)
