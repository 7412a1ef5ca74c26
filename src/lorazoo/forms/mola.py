"""MoLA (Gao et al. 2024 [89], "Higher layers need more LoRA experts"): routed LoRA experts with a
different number of experts per layer.

Form: :class:`~lorazoo.forms.loramoe.ExpertMixture` (y = W0 x + s·Σ_i ω_i(x) B_i A_i x, study
Eq. 124-125, top-k renormalized), where layer l has N_l experts. ``mola_experts`` lists the counts
from the lowest group of blocks to the highest: the blocks are split into len(mola_experts) groups
of consecutive depth, block j of L going to group ⌊j·G/L⌋ (32 blocks and (2, 4, 6, 8): blocks 0-7
get 2 experts, ..., 24-31 get 8, the paper's MoLA-▽ "inverted triangle", its best allocation on
LLaMA-2; (8, 6, 4, 2) is MoLA-△, (5, 5, 5, 5) MoLA-□).

A target's depth is its block index, the first numeric part of its path (``layers.7.mlp.up_proj``
is block 7), so every module of a block gets the same count. When some target has no numeric part
(a model without numbered blocks), every target is its own block, in target order.

Every expert has rank r_e = ⌈rank / max(mola_experts)⌉, so the layers with the most experts have
LoRA's total rank (8 experts of rank 1 at rank 8, the study's comparison) and the others less:
the paper gives every expert the same rank (8 in its LLaMA-2 runs). Top-k (the paper's top-2) in
every layer, so ``top_k`` must not exceed the smallest count. No auxiliary loss by default (the
paper describes none; ``mola_aux_weight`` adds study Eq. 126's load balancing). The counts only
change each layer's stored A (N_l·r_e, in), B (out, N_l·r_e) and router: the forward is
ExpertMixture's two matmuls, no loop over experts.
"""
from __future__ import annotations

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from ..routing import switch_loss
from .loramoe import ExpertMixture


@FORMS.register("mola", paper="MoLA (Gao et al., 2024) [89]",
                equations="study Eq. 124-125 with N_l experts in layer l; y = W0 x + s·Σ_{i<=N_l} ω_i(x) B_i A_i x",
                summary="routed LoRA experts with more experts in higher layers (per-layer expert counts)")
class MoLA(ExpertMixture):
    """MoLA: :class:`ExpertMixture` with N_l experts in layer l (``mola_experts`` by depth group)."""

    rank_bound = "k·⌈r/max N⌉ per token"
    options = {"top_k": 2, "mola_experts": [2, 4, 6, 8], "mola_aux_weight": 0.0}

    @classmethod
    def validate(cls, opts):
        super(ExpertMixture, cls).validate(opts)  # plain number checks (experts is per layer here)
        counts = opts["mola_experts"]
        if (not isinstance(counts, (list, tuple)) or not counts
                or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 256 for n in counts)):
            raise SpecError(f"mola_experts must be a non-empty list of expert counts (integers 1..256), from "
                            f"the lowest group of layers to the highest, got {counts!r}")
        opts["mola_experts"] = list(counts)  # as the saved config reads back (JSON has no tuples)
        check_number("top_k", opts["top_k"], minimum=1, integer=True)
        if opts["top_k"] > min(counts):
            raise SpecError(f"top_k ({opts['top_k']}) cannot exceed the smallest expert count in mola_experts "
                            f"({min(counts)})")
        check_number("mola_aux_weight", opts["mola_aux_weight"])

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        return max(opts["mola_experts"]) * min(in_features, out_features)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        counts = list(opts["mola_experts"])
        n = counts[layer_group(ctx, len(counts))]
        init_layer_experts(self, ExpertMixture, in_features, out_features, rank, scale, opts, ctx,
                           n, max(counts), int(opts["top_k"]))
        self.aux_weight = float(opts["mola_aux_weight"])

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None or self.aux_weight == 0:
            return None
        return self.aux_weight * switch_loss(r)


def block_index(path: str) -> int | None:
    """The first numeric part of a dotted path (its block), or None."""
    return next((int(p) for p in path.split(".") if p.isdigit()), None)


def layer_group(ctx, groups: int) -> int:
    """The depth group (0 .. groups-1) of the target being built (``ctx.path``) among the adapter's
    targets (``ctx.shapes``): block j of L distinct blocks is in group ⌊j·groups/L⌋."""
    paths = list(ctx.shapes) or [ctx.path]
    blocks = [block_index(p) for p in paths]
    if any(b is None for b in blocks):  # no numbered blocks: each target its own, in target order
        blocks = list(range(len(paths)))
    levels = sorted(set(blocks))
    j = levels.index(blocks[paths.index(ctx.path)])
    return j * groups // len(levels)


def init_layer_experts(form, base, in_features, out_features, rank, scale, opts, ctx, experts: int,
                       most: int, top_k: int) -> None:
    """Build ``form`` (an :class:`ExpertMixture` subclass) as ``base`` would with ``experts`` experts in
    this layer, each of rank ⌈rank / most⌉ (``most``: the largest count any layer of the adapter has),
    routed top-``top_k`` (at most ``experts``). Shared by the per-layer mixtures (MoLA, LLaVA-MoLE)."""
    expert_rank = ExpertMixture.expert_rank_of(rank, most)
    base.__init__(form, in_features, out_features, experts * expert_rank, scale,
                  {**opts, "experts": experts, "top_k": min(top_k, experts)}, ctx)

