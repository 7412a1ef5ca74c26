"""VB-LoRA: LoRA factors composed from a shared vector bank by top-k admixture (Li, Han & Ji [54]).

VB-LoRA (NeurIPS 2024), its top-k admixture: every rank-one component of every layer is cut into
sub-vectors of length b; each sub-vector is a top-k mixture of the vectors of one bank
B = {β_1..β_h} ⊂ R^b shared by all layers: v = Σ_{j ∈ topk(s)} softmax(s_topk)_j · β_j, with
s ∈ R^h the sub-vector's logits.
ΔW = s·B_l A_l with A_l (r, in) and B_l (out, r) assembled this way; the trainable parameters are
the bank (h·b, stored once) and the logits (r·(in/b + out/b)·h per layer).

Followed: PEFT's ``VBLoRAConfig`` / ``tuners/vblora/layer.py`` (peft 0.21.2), layout included:
A's logits (r, in/b, h) give row i of A as its in/b sub-vectors in order; B's logits (out/b, r, h)
give column j of B as its out/b sub-vectors in order, so tensors copied from a PEFT adapter give
the same outputs (tested in float32). Init as PEFT: bank U(-0.02, 0.02) (``vblora_bank_bound``),
logits N(0, 0.1²) (``vblora_logits_std``), drawn from the generator ``adapt`` seeds with the
spec's seed. Defaults: PEFT's, 256 vectors of length 256, top-2, rank 4 (PEFT's docs: k = 2 is
typically best, per the paper's discussion).

Choices:
- The update does NOT start at zero: both factors are random mixtures of a random bank, as in PEFT.
  Every entry of A and B is a convex mixture of bank entries, so |ΔW_ij| <= s·r·0.02²
  at init: small, but nonzero; ``zero_init = False`` (the contract skips "starts as base").
- Scale: PEFT applies none; here s comes from the scale part, and the preset sets
  ``scale="constant", alpha=1`` to reproduce them exactly.
- A layer whose in or out is not a multiple of b is accepted (PEFT refuses it): the last
  sub-vector is cut to fit (ceil(in/b) sub-vectors, the first ``in`` entries kept). Where b
  divides both, this is PEFT's layout exactly.
- PEFT's ``save_only_topk_weights`` (storing only the top-k indices and weights) is not offered: a
  saved adapter keeps the full logits, so training can resume from it.
- Cost: assembling A and B is a gather of r·(in + out)·k bank entries per step (no (out, in)
  tensor); then exactly LoRA's two thin matmuls. The top-k gradient reaches only the k selected
  logits of each sub-vector, as in PEFT.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from .banks import AssembledPair


class VectorBank(nn.Module):
    """The h trainable vectors of length b shared by every layer of one adapter, U(-bound, bound)."""

    def __init__(self, num_vectors: int, length: int, bound: float):
        super().__init__()
        self.vectors = nn.Parameter(torch.empty(num_vectors, length).uniform_(-bound, bound))


def admix(logits: torch.Tensor, vectors: torch.Tensor, k: int) -> torch.Tensor:
    """VB-LoRA's admixture: each row of ``logits`` (..., h) picks its top-k bank vectors and mixes them with
    the softmax of their logits; returns (..., b)."""
    top, idx = logits.topk(k, dim=-1)
    return torch.einsum("...k,...kb->...b", F.softmax(top, dim=-1), vectors[idx])


@FORMS.register("vblora", paper="VB-LoRA (Li, Han & Ji, NeurIPS 2024) [54]",
                equations="VB-LoRA top-k admixture: sub-vectors of A, B = Σ_topk softmax(s)·β from one shared bank; "
                          "ΔW = s·B A",
                summary="A and B assembled from a vector bank shared by all layers, top-k admixture of "
                        "length-b sub-vectors; trainable bank and logits")
class VBLoRA(AssembledPair):
    """h = W0 x + s·B(m ⊙ A x), A and B assembled from the shared vector bank (see the module docstring)."""

    options = {"vblora_num_vectors": 256, "vblora_vector_length": 256, "vblora_topk": 2,
               "vblora_bank_bound": 0.02, "vblora_logits_std": 0.1}
    zero_init = False  # A and B are both random mixtures at init (as PEFT)
    plain_product = False  # A, B are functions of shared tensors: factor inits and LoRA-Pro refuse
    up_params = ("logits_B",)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        h, b = int(opts.get("vblora_num_vectors", 256)), int(opts.get("vblora_vector_length", 256))
        self.topk, self.length = int(opts.get("vblora_topk", 2)), b
        self.logits_std = float(opts.get("vblora_logits_std", 0.1))
        bound = float(opts.get("vblora_bank_bound", 0.02))
        self.bank_key = f"vblora_{h}x{b}"
        self.use_bank(ctx, self.bank_key, lambda: VectorBank(h, b, bound))
        self.logits_A = nn.Parameter(torch.empty(rank, math.ceil(in_features / b), h))
        self.logits_B = nn.Parameter(torch.empty(math.ceil(out_features / b), rank, h))
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        for key in ("vblora_num_vectors", "vblora_vector_length", "vblora_topk"):
            check_number(key, opts[key], minimum=1, integer=True)
        check_number("vblora_bank_bound", opts["vblora_bank_bound"], strict=True)
        check_number("vblora_logits_std", opts["vblora_logits_std"])

    @classmethod
    def check_spec(cls, spec):
        k, h = spec.options["vblora_topk"], spec.options["vblora_num_vectors"]
        if k > h:
            raise SpecError(f"vblora_topk ({k}) must be at most vblora_num_vectors ({h}): each sub-vector mixes "
                            f"k distinct bank vectors; lower vblora_topk or enlarge the bank")

    @property
    def bank(self) -> VectorBank:
        return getattr(self, f"_bank_{self.bank_key}")

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logits_A.normal_(0, self.logits_std)
            self.logits_B.normal_(0, self.logits_std)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in)) assembled from the bank, as PEFT's ``_get_lora_matrices``."""
        vectors = self.bank.vectors
        A = admix(self.logits_A, vectors, self.topk).reshape(self.rank, -1)[:, : self.in_features]
        B = admix(self.logits_B, vectors, self.topk).transpose(1, 2).reshape(-1, self.rank)[: self.out_features]
        return B, A
