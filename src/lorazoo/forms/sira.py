"""SiRA (Zhu et al. 2023 [94]): a sparse mixture of LoRA experts, top-k routing with an expert
capacity and expert dropout on the gate.

Form: :class:`~lorazoo.forms.loramoe.ExpertMixture` (y = W0 x + s·Σ_i ω_i(x) B_i A_i x, study
Eq. 124-125, top-k renormalized) with two router options of lorazoo.routing:

* capacity (``sira_capacity_factor`` c): in training, each expert takes at most C = ⌈c·k·T/E⌉ of
  the T tokens of a forward, first come first served in token order (GShard's rule, which SiRA's
  "capacity limit restricting the maximum number of tokens each expert can process" follows); an
  over-capacity (token, expert) slot gets gate 0, the token's other gates stay as they were (no
  second renormalization, as GShard). Inference is dropless: every token gets its top-k, so an
  output never depends on the other tokens of the batch.
* expert dropout (``sira_expert_dropout`` p): dropout on the gating output ω(x) in training
  ("a novel and simple expert dropout on top of gating network"): each applied gate is zeroed with
  probability p and the others scaled by 1/(1-p); off in eval.

Auxiliary loss: ``sira_aux_weight`` x the load-balancing loss of study Eq. 126 (GShard/Switch;
f_i counts the top-k choices before capacity).

Defaults are ours where we could not check the paper's numbers: 8 experts of rank 1, top-2 (the
study's comparison), c = 1 (GShard's C = 2T/E for top-2), p = 0.1, aux weight 1e-2 (GShard's).
The capacity and dropout zero gates rather than gathering tokens per expert, so the forward is
LoRA's two matmuls over E·r_e units, with no loop over experts.
"""
from __future__ import annotations

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from ..routing import switch_loss
from .loramoe import ExpertMixture


@FORMS.register("sira", paper="SiRA (Zhu et al., 2023) [94]",
                equations="study Eq. 124-126; y = W0 x + s·Σ_i Dropout(ω_i(x))·B_i A_i x, top-k ω, "
                          "≤ ⌈c·k·T/E⌉ tokens per expert, L_aux = E·Σ_i f_i P_i",
                summary="sparse top-k LoRA experts with an expert capacity, expert dropout on the gates and "
                        "load balancing")
class SiRA(ExpertMixture):
    """SiRA's sparse mixture: :class:`ExpertMixture` whose router has a capacity and gate dropout."""

    options = {"experts": 8, "top_k": 2, "sira_capacity_factor": 1.0, "sira_expert_dropout": 0.1,
               "sira_aux_weight": 1e-2}

    @classmethod
    def validate(cls, opts):
        super().validate(opts)
        check_number("sira_capacity_factor", opts["sira_capacity_factor"], strict=True)
        check_number("sira_expert_dropout", opts["sira_expert_dropout"], maximum=0.999)
        check_number("sira_aux_weight", opts["sira_aux_weight"])
        if opts["top_k"] >= opts["experts"]:
            raise SpecError(f"SiRA is a sparse mixture: top_k ({opts['top_k']}) must be below experts "
                            f"({opts['experts']}), else the capacity has nothing to limit")

    @classmethod
    def router_options(cls, opts):
        return {"capacity_factor": float(opts["sira_capacity_factor"]),
                "gate_dropout": float(opts["sira_expert_dropout"])}

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.aux_weight = float(opts["sira_aux_weight"])

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None or self.aux_weight == 0:
            return None
        return self.aux_weight * switch_loss(r)
