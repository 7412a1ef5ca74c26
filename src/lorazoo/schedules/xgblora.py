"""XGBLoRA (Zhang et al., 2024 [41]; study Sec. II-B1): gradient boosting with rank-1 LoRA boosters.

Training runs in boosting rounds of T steps (``xgblora_interval``: a count, or below 1 a fraction of
the planned run, default 0.1: ten rounds). In each round only k = ``xgblora_layers`` (2) randomly
chosen layers train their booster (the preset's rank is 1: a rank-1 booster per layer, the paper's
weak learner); at the end of the round each chosen layer's booster is merged into its frozen base
(W0 <- W0 + s·B·A, through the adapter's base shift), re-initialized by the form (B = 0: the
model's function is unchanged) with its optimizer state dropped, and k new layers are drawn. The
merged boosters add up: a layer chosen in several rounds gets an update of rank up to that count.

"Layer" is a block of the network, as in the study's "randomly selects 2 layers": targets are
grouped by their path up to the first numeric component (``model.layers.3.self_attn.q_proj`` and
``...3.mlp.up_proj`` are block ``model.layers.3``); a target with no block index is its own layer.
The draw for round j is a permutation from a generator seeded by the spec's seed and j, so it is
reproducible and a resumed run draws the same layers (the round index and the resolved T go
through ``TrainingState``).

How the other layers are kept still: their factors keep ``requires_grad`` (so one optimizer built
before training holds every layer's factors, whichever round it is), and a post-accumulate-grad
hook drops their gradient as soon as backward writes it, so the optimizer skips them (no step, no
weight decay, no state) and gradient clipping does not see them. Their B stays 0 (they start at
the form's zero update and are re-initialized after each round they train), so their update is
zero. Departure: their factor gradients are still computed in backward and dropped; the paper's
saving of that compute (training only the chosen layers) is not realized. The paper's exact round
length and booster shrinkage were not available to me; the merge takes the whole booster
(shrinkage 1) as the study's description of merge-and-reinit.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from .merging import check_plain_product, drop_state, fold, refuse_merged


def layer_groups(paths) -> dict[str, list[str]]:
    """Block key -> its target paths: the path up to its first numeric component, else the path."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        parts = path.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[:cut + 1]) if cut is not None else path
        groups.setdefault(key, []).append(path)
    return groups


@SCHEDULES.register("xgblora", paper="XGBLoRA (Zhang et al., 2024) [41]",
                    equations="study Sec. II-B1; per round train rank-1 boosters on 2 random layers, "
                              "then W0 += s·B·A and re-init",
                    summary="boosting rounds: rank-1 boosters on k random layers, merged into the base each round")
class XGBLoRA(Schedule):
    options = {"xgblora_layers": 2, "xgblora_interval": 0.1}

    @classmethod
    def validate(cls, opts):
        check_number("xgblora_layers", opts["xgblora_layers"], minimum=1, integer=True)
        check_number("xgblora_interval", opts["xgblora_interval"], strict=True)
        every = opts["xgblora_interval"]
        if every >= 1 and every != int(every):
            raise SpecError(f"xgblora_interval is a step count (an integer) or a fraction below 1, got {every!r}")

    @classmethod
    def check_form(cls, form_cls):
        check_plain_product(form_cls, "xgblora", "merges each booster s·B·A into the base")

    def __init__(self, spec):
        super().__init__(spec)
        every = spec.options["xgblora_interval"]
        self.interval = int(every) if every >= 1 else None
        self.round = 0
        self.handle = None
        self.groups: dict[str, list[str]] = {}
        self.active: list[str] = []   # the chosen blocks of this round
        self._idle: set[int] = set()   # ids of the factors whose gradient is dropped this round

    # --- which layers train -------------------------------------------------------------------
    def attach(self, handle):
        self.handle = handle
        self.groups = layer_groups(handle.layers())
        for ad in handle.adapters().values():
            for p in ad.form.parameters():
                if p.requires_grad:  # a factor frozen by its form or optim (LoRA-FA's A) gets no gradient
                    p.register_post_accumulate_grad_hook(self._drop_idle)
        self.choose(0)

    def _drop_idle(self, p):
        if id(p) in self._idle:
            p.grad = None

    def chosen(self, j: int) -> list[str]:
        """The blocks that train in round ``j`` (reproducible from the spec's seed)."""
        keys = list(self.groups)
        k = min(int(self.spec.options["xgblora_layers"]), len(keys))
        g = torch.Generator().manual_seed((int(self.spec.seed) * 1_000_003 + j) % (2**63))
        return sorted((keys[i] for i in torch.randperm(len(keys), generator=g)[:k].tolist()), key=keys.index)

    def choose(self, j: int) -> None:
        self.round = j
        self.active = self.chosen(j)
        on = {p for key in self.active for p in self.groups[key]}
        self._idle = {id(p) for path, ad in self.handle.adapters().items() if path not in on
                      for p in ad.form.parameters()}

    # --- rounds ---------------------------------------------------------------------------------
    def plan(self, total_steps):
        every = self.spec.options["xgblora_interval"]
        if every < 1:
            self.interval = max(1, round(every * total_steps))

    def state_dict(self):
        return {"interval": self.interval, "round": self.round}

    def load_state_dict(self, state):
        if state.get("interval") is not None:
            self.interval = int(state["interval"])
        if "round" in state:
            self.choose(int(state["round"]))

    @torch.no_grad()
    def after_step(self, handle, optimizer, step):
        if self.interval is None:
            raise LorazooError(
                f"xgblora_interval={self.spec.options['xgblora_interval']} is a fraction of the run: call "
                f"handle.plan(total_steps) before training (lorazoo's trainer does), or give it in steps")
        if step % self.interval:
            return
        refuse_merged(handle, "XGBLoRA")
        layers = handle.layers()
        for key in self.active:
            for path in self.groups[key]:
                ad = layers[path].adapters[handle.name]
                fold(layers[path], ad)
                ad.form.reset_parameters()
                drop_state(optimizer, ad.form.parameters())
        self.choose(step // self.interval)
