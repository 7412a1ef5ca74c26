"""IncreLoRA's incremental rank allocation (Zhang et al. 2023 [59]; study Eq. 45 and II-B3).

Every ``increlora_interval`` steps after ``increlora_warmup_steps``, while the adapter holds fewer
than increlora_target_rank × layers active ranks, the ``increlora_top_h`` layers of highest
importance each gain ``increlora_rank_per_step`` ranks (the last ones fewer, so the total lands on
the target exactly; the authors' code may overshoot it by up to top_h·rank_per_step − 1). Layer
importance: the raw score I_l = mean over the layer's ranks in use of |θ ⊙ ∇θ| for θ in P, λ, Q
(the study: "averaging all sensitivity scores in the corresponding update matrix"), smoothed as
AdaLoRA's, Ī_l = β1 Ī_l + (1 − β1) I_l, Ū_l = β2 Ū_l + (1 − β2)|I_l − Ī_l|, s_l = Ī_l·Ū_l. The
authors' code scores |ΔW ⊙ ∂L/∂ΔW| with a backward hook on the dense (out, in) update, which would
form an (out, in) gradient every step; the parameter sensitivities need nothing beyond the
gradients the step already has. The orthogonality regularizer of study Eq. 35-36 (coefficient
``increlora_orth_reg``, 0.3 as the authors' scripts) covers the ranks in use.

Growing shapes, kept consistent with the optimizer: the form is pre-allocated to its maximum
``rank`` and ranks are unmasked (``rank_mask``), so no parameter changes shape and the optimizer
keeps the same tensors. A masked rank gets exactly zero gradient in P's column, λ and Q's row, so
its Adam moments stay zero; when a slot is (re)drawn for a new rank its rows of every optimizer
state tensor of the parameter's shape (Adam's exp_avg, exp_avg_sq) are zeroed, which is the state a
new parameter would start with. A new rank has its own learning-rate warm-up, as the authors'
separate parameter group: for ``increlora_new_warmup`` steps its update is scaled by (age+1)/W after
``optimizer.step()`` (θ ← θ_old + f·(θ_new − θ_old): for AdamW, whose step is linear in the learning
rate, this is exactly a per-rank learning-rate factor; the decay stays the trainer's; the initial
ranks and reserve follow the trainer's own warm-up only, as the authors' first groups). Reserve ranks
(advance learning) hold λ = 1e-5: their λ gradient is zeroed before the step. When the target is
reached the reserve is dropped (λ = 0, as the authors' code). A saved adapter keeps its grown ranks
in ``rank_mask`` and ``reserve_mask``.

The scale stays the scale part's s (alpha/r with r the maximum rank); the authors divide by the
current rank count, which rescales every existing rank each time one is added. The preset's
alpha = 64 at r = 16 gives s = 4, the authors' 32/ranknum at the final average rank 8. The EMAs,
the rank ages and the last step are checkpointed through ``state_dict``.

A fresh row in a running AdamW has the global step's bias correction, so its first raw updates are
up to (1 − β1)/sqrt(1 − β2) ≈ 3× a fresh optimizer's; the per-rank warm-up (1/W at its first step)
more than absorbs it. Cost: pre-allocation makes every step cost LoRA at the maximum rank (the
preset's 16 for an average budget of 8): adapter FLOPs 6·T·r_max·(in + out) per layer, against the
base's 6·T·in·out, so a few percent of a step at r ≪ d; the scoring adds one device sync per step
until the budget is spent (measured: 1.05x LoRA's step at equal rank).
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..forms.increlora import RESERVE_VALUE, IncreLoRA, rank_per_step, target_rank
from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from . import rankalloc as ra


def reset_optimizer_rows(optimizer, param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """Zero the slots ``index`` along ``dim`` of every optimizer state tensor shaped like ``param``."""
    if optimizer is None or len(index) == 0:
        return
    for v in optimizer.state.get(param, {}).values():
        if isinstance(v, torch.Tensor) and v.shape == param.shape:
            v.index_fill_(dim, index.to(v.device), 0.0)


@SCHEDULES.register("increlora", paper="IncreLoRA (Zhang et al., 2023) [59]",
                    equations="study Eq. 45 and II-B3: smoothed layer importance, top-h growth, orth. reg.",
                    summary="grow the ranks of the top-h most important layers every interval up to the budget")
class IncreLoRASchedule(Schedule):
    options = {
        "increlora_warmup_steps": 100,
        "increlora_interval": 100,
        "increlora_top_h": 9,
        "increlora_new_warmup": 100,
        "increlora_beta1": 0.85,
        "increlora_beta2": 0.85,
        "increlora_orth_reg": 0.3,
    }

    @classmethod
    def validate(cls, opts):
        check_number("increlora_warmup_steps", opts["increlora_warmup_steps"], integer=True)
        for key in ("increlora_interval", "increlora_top_h", "increlora_new_warmup"):
            check_number(key, opts[key], minimum=1, integer=True)
        for key in ("increlora_beta1", "increlora_beta2"):
            check_number(key, opts[key], strict=True)
            if opts[key] >= 1:
                raise SpecError(f"{key} must be < 1 (an EMA coefficient), got {opts[key]!r}")
        check_number("increlora_orth_reg", opts["increlora_orth_reg"])

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, IncreLoRA):
            raise SpecError(f"schedule 'increlora' grows the ranks of form 'increlora', not form "
                            f"'{form_cls.part_name}'; use form='increlora' (or the 'increlora' preset)")

    @classmethod
    def check_spec(cls, spec):
        o = spec.options
        init, target = o["increlora_init_rank"], target_rank(o, spec.rank)
        if not init <= target <= spec.rank:
            raise SpecError(f"IncreLoRA needs increlora_init_rank ({init}) <= increlora_target_rank ({target}) "
                            f"<= rank ({spec.rank}, the maximum rank a layer can grow to); adjust them")
        if rank_per_step(o, spec.rank) > spec.rank:
            raise SpecError(f"increlora_rank_per_step ({o['increlora_rank_per_step']}) cannot exceed the rank "
                            f"({spec.rank})")

    def __init__(self, spec):
        super().__init__(spec)
        o = spec.options
        self.target = target_rank(o, spec.rank)
        self.per_step = rank_per_step(o, spec.rank)
        self.advance = bool(o["increlora_advance"])
        self.warmup, self.interval, self.top_h = (o["increlora_warmup_steps"], o["increlora_interval"],
                                                  o["increlora_top_h"])
        self.new_warmup, self.beta1, self.beta2 = o["increlora_new_warmup"], o["increlora_beta1"], o["increlora_beta2"]
        self.ema: dict[str, list[float]] = {}          # path -> [Ī, Ū]
        self.ages: dict[str, torch.Tensor] = {}        # path -> (2, r): steps trained by (P/Q, λ) of each slot
        self.step = 0
        self._before: dict[str, tuple[torch.Tensor, ...]] = {}
        self._finished: bool | None = None  # the budget is spent (cached; None: not known yet)

    # --- helpers --------------------------------------------------------------------------------
    def _age(self, path: str, form: IncreLoRA) -> torch.Tensor:
        if path not in self.ages:  # the initial ranks and reserve follow the trainer's own warm-up
            self.ages[path] = torch.full((2, form.rank), self.new_warmup, dtype=torch.long)
        return self.ages[path]

    def target_total(self, forms) -> int:
        return self.target * len(forms)

    def done(self, forms) -> bool:
        return sum(int(f.rank_mask.sum()) for f in forms) >= self.target_total(forms)

    def score(self, path: str) -> float:
        i_bar, u_bar = self.ema.get(path, (0.0, 0.0))
        return i_bar * u_bar

    # --- before the optimizer step --------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, handle, optimizer):
        adapters = handle.adapters()
        forms = [ad.form for ad in adapters.values()]
        if self._finished is None:
            self._finished = self.done(forms)
        self._before = {}
        sums, counts = [], []
        for path, ad in adapters.items():
            f = ad.form
            if not self._finished:  # Σ |θ ⊙ ∇θ| over the ranks in use (one device sync for all layers)
                m = f.alive()
                total = f.lam.new_zeros(())
                if f.P.grad is not None:
                    total = total + ((f.P * f.P.grad).abs().sum(0) * m).sum()
                if f.lam.grad is not None:
                    total = total + ((f.lam * f.lam.grad).abs() * m).sum()
                if f.Q.grad is not None:
                    total = total + ((f.Q * f.Q.grad).abs().sum(1) * m).sum()
                sums.append(total)
                counts.append(m.sum() * (f.out_features + 1 + f.in_features))
            if f.lam.grad is not None:  # reserve ranks hold λ = 1e-5
                f.lam.grad.masked_fill_(f.reserve_mask.bool(), 0.0)
            if bool((self._age(path, f) < self.new_warmup).any()):
                self._before[path] = (f.P.detach().clone(), f.lam.detach().clone(), f.Q.detach().clone())
        if sums:  # the layers' raw sensitivities, smoothed (AdaLoRA's Eq. 41-43 per layer)
            raws = (torch.stack(sums) / torch.stack(counts).clamp_min(1)).tolist()
            for path, raw in zip(adapters, raws):
                i_bar, u_bar = self.ema.get(path, [0.0, 0.0])
                i_bar = self.beta1 * i_bar + (1 - self.beta1) * raw
                u_bar = self.beta2 * u_bar + (1 - self.beta2) * abs(raw - i_bar)
                self.ema[path] = [i_bar, u_bar]

    # --- after the optimizer step ---------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        self.step = step
        adapters = handle.adapters()
        for path, ad in adapters.items():
            f = ad.form
            age = self._age(path, f)
            if path in self._before:  # per-rank warm-up: scale this step's update of young ranks
                P0, lam0, Q0 = self._before[path]
                fac = ((age + 1).clamp(max=self.new_warmup).to(torch.float64) / self.new_warmup).to(f.P)
                fac_pq, fac_lam = fac[0].to(f.P.device), fac[1].to(f.P.device)
                f.P.copy_(P0 + (f.P - P0) * fac_pq)
                f.Q.copy_(Q0 + (f.Q - Q0) * fac_pq[:, None])
                f.lam.copy_(lam0 + (f.lam - lam0) * fac_lam)
            age += 1  # unused slots age too; a slot's ages restart when it is drawn or activated
            f.lam.masked_fill_(f.reserve_mask.bool(), RESERVE_VALUE)
        self._before = {}
        forms = [ad.form for ad in adapters.values()]
        if step > self.warmup and step % self.interval == 0 and not self.done(forms):
            self.grow(adapters, optimizer)
            self._finished = None

    @torch.no_grad()
    def grow(self, adapters, optimizer) -> dict[str, int]:
        """One growth step: the top-h layers (by s_l, among those not full) gain ranks; returns the
        ranks added per layer."""
        forms = [ad.form for ad in adapters.values()]
        left = self.target_total(forms) - sum(int(f.rank_mask.sum()) for f in forms)
        order = sorted((p for p, ad in adapters.items() if ad.form.rank_mask.sum() < ad.form.rank),
                       key=lambda p: -self.score(p))
        added = {}
        for path in order[: self.top_h]:
            if left <= 0:
                break
            f = adapters[path].form
            n = min(self.per_step, left, f.rank - int(f.rank_mask.sum()))
            self._activate(path, f, n, optimizer)
            added[path] = n
            left -= n
        finished = left <= 0
        for path, ad in adapters.items():
            f = ad.form
            if finished:  # the budget is spent: the reserve goes (λ = 0, as the authors' code)
                f.lam.masked_fill_(f.reserve_mask.bool(), 0.0)
                f.reserve_mask.zero_()
            elif self.advance and path in added:
                self._refill_reserve(path, f, optimizer)
        return added

    def _activate(self, path: str, f: IncreLoRA, n: int, optimizer) -> None:
        reserve = torch.nonzero(f.reserve_mask).flatten().tolist()
        empty = torch.nonzero(f.alive() == 0).flatten().tolist()
        slots = (reserve + empty)[:n]
        fresh = torch.tensor([i for i in slots if i in empty], dtype=torch.long)
        self._redraw(path, f, fresh, optimizer)
        idx = torch.tensor(slots, dtype=torch.long)
        f.rank_mask[idx.to(f.rank_mask.device)] = 1.0
        f.reserve_mask[idx.to(f.reserve_mask.device)] = 0.0
        self._age(path, f)[1, idx] = 0  # λ starts training now: its warm-up restarts

    def _refill_reserve(self, path: str, f: IncreLoRA, optimizer) -> None:
        want = min(self.per_step, f.rank - int(f.rank_mask.sum())) - int(f.reserve_mask.sum())
        if want <= 0:
            return
        empty = torch.nonzero(f.alive() == 0).flatten()[:want].cpu()
        self._redraw(path, f, empty, optimizer)
        f.reserve_mask[empty.to(f.reserve_mask.device)] = 1.0

    def _redraw(self, path: str, f: IncreLoRA, idx: torch.Tensor, optimizer) -> None:
        """A fresh rank in slots ``idx``: p, q ~ N(0, 0.02²), λ = 1e-5, zero optimizer state rows."""
        if len(idx) == 0:
            return
        dev = idx.to(f.P.device)
        f.P[:, dev] = torch.randn(f.P.shape[0], len(idx), dtype=f.P.dtype, device=f.P.device) * 0.02
        f.Q[dev] = torch.randn(len(idx), f.Q.shape[1], dtype=f.Q.dtype, device=f.Q.device) * 0.02
        f.lam[dev] = RESERVE_VALUE
        reset_optimizer_rows(optimizer, f.P, dev, 1)
        reset_optimizer_rows(optimizer, f.Q, dev, 0)
        reset_optimizer_rows(optimizer, f.lam, dev, 0)
        self._age(path, f)[:, idx] = 0

    # --- loss, output, checkpoint ---------------------------------------------------------------
    def aux_loss(self, handle):
        reg = self.spec.options["increlora_orth_reg"]
        if reg == 0:
            return None
        return reg * torch.stack([ad.form.orthogonality() for ad in handle.adapters().values()]).sum()

    def summary(self, handle):
        return ra.allocation_summary(handle)

    def state_dict(self):
        keys = sorted(self.ages)
        state = {"step": self.step, "ema": {p: list(v) for p, v in self.ema.items()}, "age_keys": keys}
        for i, k in enumerate(keys):
            state[f"age.{i}"] = self.ages[k].clone()
        return state

    def load_state_dict(self, state):
        try:
            self.step = int(state.get("step", 0))
            self.ema = {p: [float(a), float(b)] for p, (a, b) in state.get("ema", {}).items()}
            self.ages = {k: state[f"age.{i}"].clone().long() for i, k in enumerate(state.get("age_keys", []))}
        except (KeyError, TypeError, ValueError) as e:
            raise LorazooError(f"the IncreLoRA schedule state in the checkpoint is incomplete ({e})") from None
