"""LLaVA-MoLE (Chen et al. 2024 [97]): a sparse mixture of LoRA experts in the MLP layers, each token
routed to its top-1 expert; plain LoRA elsewhere.

From the paper's abstract (the study only names the method; we could not read the paper's body or
code here): "creating a set of LoRA experts specifically for the MLP layer, and route each token to
the top-1 expert based on a routing function ... the LoRA experts are sparsely activated, the
training and inference cost are kept roughly constant compared to the original LoRA method".

* A target is an MLP layer when a part of its dotted path is one of ``llava_mole_mlp`` (default:
  mlp, gate_proj, up_proj, down_proj, fc1, fc2, ffn, c_fc, dense_h_to_4h, dense_4h_to_h). There it is
  an :class:`~lorazoo.forms.loramoe.ExpertMixture` of ``experts`` experts of rank ⌈rank/experts⌉,
  top-1; every other target is one expert of rank ``rank`` with gate 1, exactly LoRA (its router,
  one row, is kept so every layer has the same tensors; its gradient is 0).
* Top-1 as the Switch Transformer, which a top-1 LoRA MoE follows: the chosen expert's output is
  scaled by its softmax probability g_i (not renormalized to 1), so the task loss trains the
  router; plus the Switch balancing loss (study Eq. 126) with weight ``llava_mole_aux_weight``
  = 1e-2 (Switch's). Both are our choices.
* 8 experts of rank 1 on MLP layers by default (the study's comparison at LoRA's rank 8).

The per-layer count reuses MoLA's mechanism (:func:`~lorazoo.forms.mola.init_layer_experts`); the
forward is ExpertMixture's two matmuls, no loop over experts.
"""
from __future__ import annotations

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from ..routing import switch_loss
from .loramoe import ExpertMixture
from .mola import init_layer_experts

MLP_NAMES = ["mlp", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "ffn", "c_fc", "dense_h_to_4h",
             "dense_4h_to_h"]


@FORMS.register("llava_mole", paper="LLaVA-MoLE (Chen et al., 2024) [97]",
                equations="MLP layers: y = W0 x + s·g_{i*}(x)·B_{i*} A_{i*} x, i* = argmax_i g_i(x); "
                          "other layers: LoRA; L_aux = E·Σ_i f_i P_i",
                summary="top-1 sparse LoRA experts in the MLP layers, plain LoRA elsewhere")
class LLaVAMoLE(ExpertMixture):
    """LLaVA-MoLE: top-1 routed experts on MLP targets, one expert (LoRA) on the others."""

    rank_bound = "⌈r/E⌉ per token on MLP layers, r elsewhere"
    options = {"experts": 8, "llava_mole_mlp": list(MLP_NAMES), "llava_mole_aux_weight": 1e-2}

    @classmethod
    def validate(cls, opts):
        super(ExpertMixture, cls).validate(opts)
        check_number("experts", opts["experts"], minimum=1, integer=True, maximum=256)
        names = opts["llava_mole_mlp"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise SpecError(f"llava_mole_mlp must be a list of module names marking MLP layers, got {names!r}")
        opts["llava_mole_mlp"] = list(names)
        check_number("llava_mole_aux_weight", opts["llava_mole_aux_weight"])

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        return min(in_features, out_features)  # the plain-LoRA layers hold the whole rank in one expert

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        mlp = is_mlp(ctx.path or "", opts["llava_mole_mlp"])
        n = int(opts["experts"]) if mlp else 1
        init_layer_experts(self, ExpertMixture, in_features, out_features, rank, scale, opts, ctx, n, n, 1)
        self.is_mlp = mlp
        self.gate.renormalize = False  # Switch's top-1: the chosen expert scaled by g_i
        self.aux_weight = float(opts["llava_mole_aux_weight"])

    def aux_loss(self):
        r = self.gate.training_routing()
        if r is None or self.aux_weight == 0 or self.experts < 2:
            return None
        return self.aux_weight * switch_loss(r)


def is_mlp(path: str, names) -> bool:
    """Whether a dotted path has a part named in ``names``."""
    return bool(set(path.split(".")) & set(names))
