"""AdaLoRA's budget schedule (Zhang et al. 2023 [22]; study Eq. 36-44).

At each masking step the ``b(t)`` triplets (p_i, λ_i, q_i) with the highest importance, ranked
GLOBALLY over every layer of the adapter, are kept; the others' λ are set to zero (Eq. 37) and
recorded as pruned in the form's ``rank_mask`` buffer, which the form applies in its forward.
"""
from __future__ import annotations

import torch

from ..distributed import like, whole
from ..errors import LorazooError, SpecError
from ..forms.adalora import AdaLoRA
from ..parts import Schedule, check_number
from ..registry import SCHEDULES


def budget(t: int, b0: int, bT: int, t_init: int, t_final: int, total: int) -> int:
    """b(t) of study Eq. 38-39: b0 before t_i, b_T from T − t_f on, a cubic decay in between.

    The cubic part is truncated to an integer, as in the authors' code and PEFT.
    """
    if t < t_init:
        return b0
    if t >= total - t_final:
        return bT
    return bT + int((b0 - bT) * (1 - (t - t_init) / (total - t_init - t_final)) ** 3)


def resolve_steps(opts: dict, total: int) -> tuple[int, int, int]:
    """(T, t_i, t_f) in steps for a run of ``total`` steps (adalora_total_steps wins when set);
    warmup and final steps below 1 are fractions of T. SpecError when no step is left to decay over."""
    T = opts["adalora_total_steps"] or total
    ti, tf = (int(round(v * T)) if v < 1 else int(v)
              for v in (opts["adalora_warmup_steps"], opts["adalora_final_steps"]))
    if T <= ti + tf:
        raise SpecError(
            f"AdaLoRA's run of {T} steps must exceed adalora_warmup_steps + adalora_final_steps ({ti} + {tf}) "
            f"so the budget has steps to decay over; train longer or lower those two options")
    return T, ti, tf


def default_target_rank(init_rank: int) -> int:
    """Two thirds of the initial rank: the paper's "initial rank 1.5 times the final average"
    (PEFT's defaults init_r=12, target_r=8)."""
    return max(1, round(2 * init_rank / 3))


@SCHEDULES.register("adalora", paper="AdaLoRA (Zhang et al., 2023) [22]",
                    equations="study Eq. 36-44: sensitivity EMA, triplet importance, cubic budget, orth. reg.",
                    summary="global top-b(t) triplet masking on a cubic budget, orthogonality regularizer")
class AdaLoRASchedule(Schedule):
    """Importance-driven rank budgeting for the ``adalora`` form.

    - before_step (raw gradients): I = |θ ⊙ ∇θ| (Eq. 40), Ī_t = β1 Ī_{t−1} + (1 − β1) I (Eq. 41),
      Ū_t = β2 Ū_{t−1} + (1 − β2)|I − Ī_t| (Eq. 42 as in the AdaLoRA paper's Eq. 9 and the authors'
      code; the study writes Ī_{t−1}), s = Ī ⊙ Ū (Eq. 43), for P, λ and Q.
    - after_step(t): at every ``adalora_interval``-th step before T − t_f, and once at T − t_f,
      keep the top b(t) triplets by S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) (Eq. 44) and
      prune the rest (Eq. 37). From T − t_f on the final pattern is fixed, as in the authors' code.
      Between masking steps the pruned λ are held at zero and out of the forward (``rank_mask``).
    - aux_loss: adalora_orth_reg · mean over the 2L matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F, as the
      authors' ``compute_orth_regu`` and PEFT (study Eq. 35-36 write the squared norms summed: on
      MiniLM's 36 targets that term starts near 37 against a task loss of 0.69 and swamps it).

    Budgets: b(0) = adalora_init_rank (default: the rank) × layers, b(T) = adalora_target_rank
    (default: 2/3 of the initial rank) × layers; T = adalora_total_steps (default: the run's length,
    from ``handle.plan(total_steps)``, which lorazoo's trainer calls), t_i and t_f the warmup and
    final steps: a count, or below 1 a fraction of T (defaults 0.1 and 0.3). The smoothed scores
    live here, not in the saved adapter (as in PEFT).
    """

    options = {
        "adalora_init_rank": None,
        "adalora_target_rank": None,
        "adalora_total_steps": None,
        "adalora_warmup_steps": 0.1,
        "adalora_final_steps": 0.3,
        "adalora_interval": 10,
        "adalora_beta1": 0.85,
        "adalora_beta2": 0.85,
        "adalora_orth_reg": 0.1,
    }

    @classmethod
    def validate(cls, opts):
        for key in ("adalora_init_rank", "adalora_target_rank"):
            if opts[key] is not None:
                check_number(key, opts[key], minimum=1, integer=True)
        if opts["adalora_total_steps"] is not None:
            check_number("adalora_total_steps", opts["adalora_total_steps"], minimum=1, integer=True)
        for key in ("adalora_warmup_steps", "adalora_final_steps"):
            check_number(key, opts[key])
            if opts[key] >= 1 and opts[key] != int(opts[key]):
                raise SpecError(f"{key} is a step count (an integer) or a fraction of the run below 1, "
                                f"got {opts[key]!r}")
        check_number("adalora_interval", opts["adalora_interval"], minimum=1, integer=True)
        for key in ("adalora_beta1", "adalora_beta2"):
            check_number(key, opts[key], strict=True)
            if opts[key] >= 1:
                raise SpecError(f"{key} must be < 1 (an EMA coefficient), got {opts[key]!r}")
        check_number("adalora_orth_reg", opts["adalora_orth_reg"])
        if opts["adalora_total_steps"] is not None:
            resolve_steps(opts, opts["adalora_total_steps"])

    @classmethod
    def check_form(cls, form_cls):
        if not issubclass(form_cls, AdaLoRA):
            raise SpecError(
                f"schedule 'adalora' masks the singular values of form 'adalora', not form "
                f"'{form_cls.part_name}'; use form='adalora' (or the 'adalora' preset)")

    @classmethod
    def check_spec(cls, spec):
        init = spec.options["adalora_init_rank"] or spec.rank
        target = spec.options["adalora_target_rank"]
        if init > spec.rank:
            raise SpecError(f"adalora_init_rank ({init}) cannot exceed the rank ({spec.rank}) of the "
                            f"adalora form; raise rank or lower adalora_init_rank")
        if target is not None and target > init:
            raise SpecError(f"adalora_target_rank ({target}) must be <= the initial rank ({init}): the "
                            f"budget only shrinks; lower adalora_target_rank or raise rank")

    def __init__(self, spec):
        super().__init__(spec)
        o = spec.options
        self.total = self.t_init = self.t_final = None  # set from the options or by plan()
        if o["adalora_total_steps"] is not None:
            self.plan(o["adalora_total_steps"])
        self.interval, self.beta1, self.beta2 = o["adalora_interval"], o["adalora_beta1"], o["adalora_beta2"]
        self.init_rank = o["adalora_init_rank"] or spec.rank
        self.target_rank = o["adalora_target_rank"] or default_target_rank(self.init_rank)
        self.ema: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (Ī, Ū) per tensor
        self.step = 0  # the last step seen by after_step

    # --- budget -------------------------------------------------------------------------------
    def plan(self, total_steps: int) -> None:
        self.total, self.t_init, self.t_final = resolve_steps(self.spec.options, total_steps)

    def budgets(self, forms: list[AdaLoRA]) -> tuple[int, int]:
        """(b0, b_T) in triplets, summed over the adapter's layers."""
        total = sum(f.rank for f in forms)
        b0 = min(total, self.init_rank * len(forms))
        bT = self.target_rank * len(forms)
        if bT > b0:
            raise LorazooError(f"adalora target budget {bT} exceeds the initial budget {b0}; "
                               f"lower adalora_target_rank")
        return b0, bT

    def budget_at(self, t: int, forms: list[AdaLoRA]) -> int:
        return budget(t, *self.budgets(forms), self.t_init, self.t_final, self.total)

    def is_masking_step(self, t: int) -> bool:
        final = self.total - self.t_final
        return t == final or (t < final and t % self.interval == 0)

    # --- importance -----------------------------------------------------------------------------
    @torch.no_grad()
    def _require_plan(self) -> None:
        if self.total is None:
            raise LorazooError(
                "AdaLoRA's budget schedule needs the length of the run: set adalora_total_steps=N in the "
                "spec, or call handle.plan(total_steps=N) before training (lorazoo's trainer does)")

    def before_step(self, handle, optimizer):
        self._require_plan()
        if self.step + 1 > self.total - self.t_final:
            return  # the final pattern is fixed: no more scores needed
        for path, ad in handle.adapters().items():
            for name in ("P", "lam", "Q"):
                p = getattr(ad.form, name)
                sens = torch.zeros_like(p) if p.grad is None else (p * p.grad).abs()  # Eq. 40
                if (path, name) not in self.ema:
                    self.ema[(path, name)] = (torch.zeros_like(p), torch.zeros_like(p))
                i_bar, u_bar = self.ema[(path, name)]
                i_bar.mul_(self.beta1).add_(sens, alpha=1 - self.beta1)                  # Eq. 41
                u_bar.mul_(self.beta2).add_((sens - i_bar).abs(), alpha=1 - self.beta2)  # Eq. 42

    def score(self, path: str, name: str) -> torch.Tensor:
        """s = Ī ⊙ Ū (Eq. 43) of one tensor, elementwise; whole under FSDP2 (the EMAs are kept per
        shard, as the sharded gradients they smooth; gathering them is collective)."""
        i_bar, u_bar = self.ema[(path, name)]
        return whole(i_bar * u_bar)

    def triplet_importance(self, path: str) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) (Eq. 44), shape (r,)."""
        return self.score(path, "lam") + self.score(path, "P").mean(0) + self.score(path, "Q").mean(1)

    # --- masking --------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        self._require_plan()
        self.step = step
        adapters = handle.adapters()
        forms = [ad.form for ad in adapters.values()]
        if not self.is_masking_step(step):
            for form in forms:  # pruned λ stay zero (momentum would move them), as the authors' code
                form.lam.mul_(like(form.rank_mask, form.lam))
            return
        keep_n = self.budget_at(step, forms)
        if keep_n >= sum(f.rank for f in forms):
            return  # nothing to prune
        if any((p, "lam") not in self.ema for p in adapters):
            raise LorazooError(
                "AdaLoRA ranks triplets by gradient sensitivity: call handle.before_step(optimizer) after "
                "backward() and before optimizer.step() on every step")
        device = forms[0].lam.device
        scores = torch.cat([self.triplet_importance(p).to(device) for p in adapters])
        keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        keep[scores.topk(keep_n).indices] = True  # θ_t = the b(t)-th largest score (Eq. 37)
        for form, k in zip(forms, keep.split([f.rank for f in forms])):
            k = k.to(form.rank_mask.device)
            form.rank_mask.copy_(k)
            form.lam.masked_fill_(like(~k, form.lam), 0.0)

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self):
        """The smoothed sensitivities (Ī, Ū) of every tensor, the last step seen and the budget's
        plan; the masks are the forms' ``rank_mask`` buffers, saved with the adapter."""
        keys = sorted(self.ema)
        state = {"step": self.step, "plan": [self.total, self.t_init, self.t_final],
                 "ema_keys": [list(k) for k in keys]}
        for i, k in enumerate(keys):
            state[f"ema_i.{i}"], state[f"ema_u.{i}"] = self.ema[k]
        return state

    def load_state_dict(self, state):
        keys = state.get("ema_keys", [])
        try:
            ema = {(path, name): (state[f"ema_i.{i}"], state[f"ema_u.{i}"]) for i, (path, name) in enumerate(keys)}
        except (KeyError, ValueError, TypeError) as e:
            raise LorazooError(f"the AdaLoRA schedule state in the checkpoint is incomplete ({e})") from None
        self.ema = {k: (i.clone(), u.clone()) for k, (i, u) in ema.items()}
        self.step = int(state.get("step", 0))
        total, t_init, t_final = state.get("plan", [None, None, None])
        if total is not None:
            self.total, self.t_init, self.t_final = int(total), int(t_init), int(t_final)

    # --- regularizer ----------------------------------------------------------------------------
    def aux_loss(self, handle):
        reg = self.spec.options["adalora_orth_reg"]
        if reg == 0:
            return None
        terms = [t for ad in handle.adapters().values() for t in ad.form.orthogonality_terms()]
        # the authors' compute_orth_regu (and PEFT): the mean over the 2L matrices of ‖·‖_F, not squared
        return reg * torch.stack(terms).clamp_min(1e-30).sqrt().mean()
