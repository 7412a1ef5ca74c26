"""PRoLoRA: partially shared, rotation-enhanced LoRA (Wang et al., ACL 2024 [51]; study Eq. 34).

h = W0 x + s·B(m ⊙ A x) with A (r, in), B (out, r) built from fewer trainable parameters (intra-layer
sharing, study Eq. 34):

- broadcast reduction: the first r - u ranks of A are one chunk A0 (r - u, ceil(in/m)) repeated
  m times along the input dimension; those of B one chunk B0 (ceil(out/n), r - u) repeated n times
  along the output dimension (m, n = ``prolora_share_a``, ``prolora_share_b``);
- rotation enhancement: copy k of a chunk is rolled along the rank dimension by k·stride,
  A[i, block k] = A0[(i + k·s_A) mod (r - u)], B[block k, i] = B0[:, (i + k·s_B) mod (r - u)],
  strides s_A = max(floor((r - u)/m), 1), s_B = max(floor((r - u)/n), 1) (``prolora_rotation``
  turns it off: plain chunk broadcast, the paper's CLoRA ablation);
- partially-sharing refinement: the last u ranks (``prolora_unshared``) are ordinary unshared
  LoRA ranks A_u (u, in), B_u (out, u);
- rectified initialization: A0 and A_u Kaiming-uniform with the fan-in of the *full* A (bound
  1/sqrt(in), as a plain LoRA A of this layer), not of the chunk; B0 and B_u zero, so ΔW = 0.

Followed: the authors' code (Forence1999/PRoLoRA, ``modules/chunkwise_sharing_LoRA.py``): the
layout (shared ranks first, then the unshared ones; the last chunk cut to in/out when m, n do not
divide them), the strides computed from the shared rank r - u (the paper writes r/m), and the
scale α/r over all r ranks. m = n = 1, u = 0 is exactly LoRA (tested: "a superset of LoRA").

Defaults: m = n = 2 and u = 1 (the paper's Fig. 1 illustrates r = 4, u = 1, m = 2, n = 3; its
experiments compare PRoLoRA at about half of LoRA's parameters, which m = n = 2 gives:
u(in + out) + (r - u)(in/2 + out/2)). Trainable parameters (tested):
u·(in + out) + (r - u)·(ceil(in/m) + ceil(out/n)).

Cost: A and B are gathered from the chunks once per step (index tensors cached as non-persistent
buffers, so the file holds only A0, B0, A_u, B_u); then LoRA's two thin matmuls. No loop over chunks.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SpecError
from ..parts import check_number
from ..registry import FORMS
from .banks import AssembledPair


@FORMS.register("prolora", paper="PRoLoRA (Wang et al., ACL 2024) [51]",
                equations="study Eq. 34: A = [A0, Roll(A0, s_A), ..., | A_u], B likewise; ΔW = s·B A",
                summary="first r - u ranks of A (B) one chunk broadcast m (n) times along in (out), each copy "
                        "rolled along the rank by a stride; u unshared ranks; rectified Kaiming init")
class PRoLoRA(AssembledPair):
    """h = W0 x + s·B(m ⊙ A x), A and B assembled from rolled copies of one chunk plus u unshared ranks."""

    options = {"prolora_unshared": 1, "prolora_share_a": 2, "prolora_share_b": 2, "prolora_rotation": True}
    plain_product = False  # A, B are tied within themselves: factor inits and LoRA-Pro refuse it
    up_params = ("B0", "B_u")

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        u = int(opts.get("prolora_unshared", 1))
        if u > rank:
            raise SpecError(f"prolora_unshared ({u}) must be at most the layer's rank ({rank}); lower it")
        self.m, self.n = int(opts.get("prolora_share_a", 2)), int(opts.get("prolora_share_b", 2))
        self.rotation = bool(opts.get("prolora_rotation", True))
        self.unshared, self.shared_rank = u, rank - u
        rs = self.shared_rank
        self.chunk_a, self.chunk_b = math.ceil(in_features / self.m), math.ceil(out_features / self.n)
        self.A0 = nn.Parameter(torch.empty(rs, self.chunk_a))
        self.B0 = nn.Parameter(torch.empty(self.chunk_b, rs))
        self.A_u = nn.Parameter(torch.empty(u, in_features))
        self.B_u = nn.Parameter(torch.empty(out_features, u))
        # idx[i, k] = (i + k·stride) mod (r - u): which row of the chunk rank i of copy k reads
        stride_a, stride_b = max(rs // self.m, 1), max(rs // self.n, 1)
        self.register_buffer("idx_a", self._index(rs, self.m, stride_a), persistent=False)
        self.register_buffer("idx_b", self._index(rs, self.n, stride_b), persistent=False)
        self.reset_parameters()

    def _index(self, rs: int, copies: int, stride: int) -> torch.Tensor:
        i, k = torch.arange(rs)[:, None], torch.arange(copies)[None, :]
        return (i + k * stride * self.rotation) % max(rs, 1)

    @classmethod
    def validate(cls, opts):
        check_number("prolora_unshared", opts["prolora_unshared"], integer=True)
        check_number("prolora_share_a", opts["prolora_share_a"], minimum=1, integer=True)
        check_number("prolora_share_b", opts["prolora_share_b"], minimum=1, integer=True)
        if not isinstance(opts["prolora_rotation"], bool):
            raise SpecError(f"prolora_rotation must be True or False, got {opts['prolora_rotation']!r}")

    @classmethod
    def check_spec(cls, spec):
        u = spec.options["prolora_unshared"]
        if u > spec.rank:
            raise SpecError(f"prolora_unshared ({u}) must be at most rank ({spec.rank}): u of the r ranks are "
                            f"unshared; lower prolora_unshared or raise rank")

    def reset_parameters(self) -> None:
        """Rectified init: U(±1/sqrt(in)) (Kaiming a = sqrt(5) with the full A's fan-in) for A0 and A_u."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.A0.uniform_(-bound, bound)
            self.A_u.uniform_(-bound, bound)
            self.B0.zero_()
            self.B_u.zero_()

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in)): shared ranks first (rolled chunk copies), then the u unshared ones."""
        rs = self.shared_rank
        # A0[idx_a]: (rs, m, ca) -> (rs, m·ca); B0[:, idx_b]: (cb, rs, n) -> (n, cb, rs) -> (n·cb, rs)
        A_s = self.A0[self.idx_a].reshape(rs, self.m * self.chunk_a)[:, : self.in_features]
        B_s = self.B0[:, self.idx_b].permute(2, 0, 1).reshape(self.n * self.chunk_b, rs)[: self.out_features]
        return torch.cat([B_s, self.B_u], dim=1), torch.cat([A_s, self.A_u], dim=0)
