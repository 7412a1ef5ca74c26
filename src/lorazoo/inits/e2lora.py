"""E2LoRA's calibration: proxy entropy, sharing intervals, ranks per interval ([55]).

The sources and what rests on them are in ``lorazoo.forms.e2lora``. Public material (the abstract
and the papernotes.org summary) says only: a gradient-based proxy entropy per pre-trained layer;
adjacent layers of similar proxy entropy share (one interval); each interval's rank from the
layer-wise absolute proxy entropy; about half LoRA's trainable parameters. Every formula and
default below is a choice made here (unverified: the paper's full text could not be read here):

- Gradient: G = dL/dW (out, in) of each target, the mean over the calibration batches of the
  frozen pre-trained model (``calibration.collect``, as LoRA-GA and GoRA; all-reduced across
  processes).
- Proxy entropy (``e2lora_entropy``): "spectral" (default), the Shannon entropy of G's normalized
  spectrum, H = -Σ_k p_k ln p_k with p_k = σ_k² / Σ_j σ_j² (σ the singular values of G), so exp(H)
  is the effective rank of the gradient: the number of directions the task pushes the layer in,
  which is what a rank budget buys. "elementwise": the entropy of p_ij = |G_ij| / Σ|G|. H = 0 for
  a zero gradient.
- A block's proxy entropy is the mean of its targets' H (a block is the path up to its first
  numeric part, ``forms.e2lora.block_key``).
- Partition (adjacent layers only, greedy from the first block of each stack): block b joins the
  current interval when it follows the interval's last block, d(H_b, mean H of the interval) <=
  ``e2lora_threshold`` (default 0.1) with the relative difference d(a, b) = |a - b| / max(a, b)
  (0 when both are 0), and the interval is shorter than ``e2lora_max_interval`` (default 0: no
  bound); otherwise b opens a new interval. Comparing with the interval's mean, not only with
  the previous block, keeps a slow drift from chaining a whole stack into one interval.
- Budget: the adapter's trainable parameters are ``e2lora_budget`` (default 0.5: the abstract's
  "approximately 50% fewer") of LoRA-r's on the same targets, P = ρ·Σ_i r·(in_i + out_i), r the
  spec's rank.
- Ranks: interval k gets the share a_k = Σ_{i in k} H_i / Σ_i H_i of P (its absolute information
  content: an interval of more, or more informative, layers gets more; a_k = n_k / N if every H is 0),
  and a rank of its own costs f_k parameters per rank unit (per module type in the interval: in + out
  shared once under "AB"; in + n·out under "A", n·in + out under "B", n the layers of that type). So
  r_k* = P·a_k / f_k, clipped to [1, min(in, out) of its layers] by GoRA's water-filling and rounded
  by largest remainder (``inits.gora.allocate``): Σ_k f_k·r_k <= P, and with one shape per type and
  every type in every interval the budget is met exactly (Σ_k r_k = ρ·r·L under "AB", tested).
  Leftover budget goes rank by rank to the largest remainders while a rank still fits, so a cheap
  interval (a lone pooler) may take a few more ranks than its share. A budget below rank 1
  everywhere is refused.
- No data is read when ``e2lora_intervals`` and ``e2lora_ranks`` are both given; with only the
  intervals, the ranks are allocated from the data over them.
The decided intervals and ranks are recorded in the adapter's spec (``Init.decided_options``), so
a load rebuilds the shapes without data, and ``lorazoo train`` prints them (``Init.summary``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SpecError
from ..parts import BuildContext, check_choice, check_number
from ..registry import INITS
from .calibration import CalibratedInit, shape_of
from .gora import allocate

ENTROPIES = ("spectral", "elementwise")


def proxy_entropy(grad: torch.Tensor, kind: str = "spectral") -> float:
    """H of the calibration gradient G (out, in): of its normalized spectrum σ²/Σσ² ("spectral") or of
    |G|/Σ|G| ("elementwise"), in nats; 0 for a zero gradient."""
    g = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
    mass = torch.linalg.svdvals(g).square() if kind == "spectral" else g.abs().flatten()
    total = mass.sum()
    if not total > 0:
        return 0.0
    p = mass / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def relative_difference(a: float, b: float) -> float:
    top = max(abs(a), abs(b))
    return abs(a - b) / top if top > 0 else 0.0


def partition(block_entropy: dict[str, float], threshold: float, max_len: int = 0) -> list[list[str]]:
    """Greedy intervals of adjacent blocks (see the module docstring), stacks in order of first
    appearance, blocks in index order; a block outside any stack is an interval of its own."""
    from ..forms.e2lora import parse_block

    stacks: dict[str, list[tuple[int | None, str]]] = {}
    for key in block_entropy:
        stack, idx = parse_block(key)
        stacks.setdefault(stack if idx is not None else "\0" + key, []).append((idx, key))
    intervals: list[list[str]] = []
    for blocks in stacks.values():
        blocks.sort(key=lambda b: -1 if b[0] is None else b[0])
        current = [blocks[0]]
        for idx, key in blocks[1:]:
            mean = sum(block_entropy[k] for _, k in current) / len(current)
            if (idx == current[-1][0] + 1 and relative_difference(block_entropy[key], mean) <= threshold
                    and (max_len == 0 or len(current) < max_len)):
                current.append((idx, key))
            else:
                intervals.append([k for _, k in current])
                current = [(idx, key)]
        intervals.append([k for _, k in current])
    return intervals


def rank_cost(members: list[str], shapes: dict[str, tuple[int, int]], types: dict[str, str], share: str) -> int:
    """Trainable parameters per unit of rank of one interval whose targets are ``members``."""
    by_type: dict[str, list[str]] = {}
    for p in members:
        by_type.setdefault(types[p], []).append(p)
    cost = 0
    for paths in by_type.values():
        fin, fout = shapes[paths[0]]
        n = len(paths)
        cost += (fin if "A" in share else n * fin) + (fout if "B" in share else n * fout)
    return cost


@INITS.register("e2lora", paper="E²LoRA (Li et al., ICLR 2026) [55]",
                equations="no equation in the study; H = spectral entropy of the calibration gradient (choice), "
                          "adjacent blocks with |ΔH|/H <= tau share, r_k ∝ Σ_{i in k} H_i under rho·LoRA's parameters",
                summary="sharing intervals of adjacent layers by proxy-entropy similarity, ranks per interval by "
                        "absolute proxy entropy under half LoRA's parameters; LoRA's init (starts as the base)")
class E2LoRAInit(CalibratedInit):
    """E2LoRA's intervals and ranks from one gradient pass; see the module docstring."""

    collects = ("grad",)
    needs_factors = False
    options = {"e2lora_budget": 0.5, "e2lora_threshold": 0.1, "e2lora_max_interval": 0,
               "e2lora_entropy": "spectral"}

    def __init__(self, spec):
        super().__init__(spec)
        self.needs_calibration = spec.options.get("e2lora_ranks") is None  # hand-given intervals and ranks
        self._intervals = self._interval_ranks = None
        self._ranks: dict[str, int] = {}
        self.entropy: dict[str, float] = {}

    @classmethod
    def validate(cls, opts):
        check_number("e2lora_budget", opts["e2lora_budget"], strict=True, maximum=1e6)
        check_number("e2lora_threshold", opts["e2lora_threshold"])
        check_number("e2lora_max_interval", opts["e2lora_max_interval"], integer=True, maximum=2**31)
        check_choice("e2lora_entropy", opts["e2lora_entropy"], ENTROPIES)

    @classmethod
    def check_form(cls, form_cls):
        from ..forms.e2lora import E2LoRA

        if not issubclass(form_cls, E2LoRA):
            raise SpecError(f"init 'e2lora' decides the sharing intervals of form 'e2lora'; form "
                            f"'{form_cls.part_name}' has none")

    def prepare(self, model, targets, calibration):
        from ..forms.e2lora import block_key, interval_index

        o = self.spec.options
        keys = {p: block_key(p) for p in targets}
        intervals, ranks = o["e2lora_intervals"], o["e2lora_ranks"]
        if intervals is not None:
            interval_index(intervals, keys.values())  # refused before the (costly) pass
        if ranks is None:
            super().prepare(model, targets, calibration)
            self.entropy = {p: proxy_entropy(self.stats[p].grad, o["e2lora_entropy"]) for p in targets}
            self.stats = None  # the gradients are not needed past this point
            if intervals is None:
                block = {}
                for p, k in keys.items():
                    block.setdefault(k, []).append(self.entropy[p])
                intervals = partition({k: sum(v) / len(v) for k, v in block.items()}, o["e2lora_threshold"],
                                      int(o["e2lora_max_interval"]))
            ranks = self.allocate(intervals, targets, keys)
        index = interval_index(intervals, keys.values())
        self._intervals, self._interval_ranks = [list(i) for i in intervals], [int(r) for r in ranks]
        self._ranks = {p: self._interval_ranks[index[k]] for p, k in keys.items()}

    def allocate(self, intervals, targets, keys) -> list[int]:
        """Ranks per interval: shares of the budget by absolute proxy entropy (module docstring)."""
        o, r = self.spec.options, self.spec.rank
        form_cls = self.spec.part_classes()["form"]
        shapes = {p: shape_of(m) for p, m in targets.items()}
        types = {p: BuildContext(nn.ModuleDict(), "", 0, 0, 0, shapes).module_type(p) for p in shapes}
        members = [[p for p in targets if keys[p] in set(i)] for i in intervals]
        total = sum(self.entropy.values())
        shares = {n: (sum(self.entropy[p] for p in m) / total if total > 0 else len(m) / len(targets))
                  for n, m in enumerate(members)}
        cost = {n: float(rank_cost(m, shapes, types, o["e2lora_share"])) for n, m in enumerate(members)}
        high = {n: min(form_cls.rank_limit(*shapes[p], o) for p in m) for n, m in enumerate(members)}
        budget = o["e2lora_budget"] * sum(r * (fin + fout) for fin, fout in shapes.values())
        floor = sum(cost.values())
        if floor > budget:
            raise SpecError(f"init 'e2lora': the budget e2lora_budget·(LoRA-{r}'s parameters) = {budget:g} is below "
                            f"rank 1 in each of the {len(intervals)} sharing intervals ({floor:g} parameters); raise "
                            f"rank or e2lora_budget")
        got = allocate(shares, cost, budget / floor, {n: 1 for n in cost}, high)
        return [got[n] for n in range(len(intervals))]

    def ranks(self):
        return dict(self._ranks)

    def decided_options(self):
        return {"e2lora_intervals": self._intervals, "e2lora_ranks": self._interval_ranks}

    @classmethod
    def summary(cls, handle):
        from ..forms.e2lora import interval_label

        o = handle.spec.options
        intervals, ranks = o.get("e2lora_intervals"), o.get("e2lora_ranks")
        if intervals is None or ranks is None:
            return None
        return {"intervals": {interval_label(i): r for i, r in zip(intervals, ranks)},
                "total_rank": sum(ranks), "trainable": handle.num_trainable()}
