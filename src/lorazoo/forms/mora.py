"""MoRA (Jiang et al., 2024, 'MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning') [46].

A square trainable matrix M (r̂ x r̂) between two fixed, parameter-free operators (MoRA Sec. 3;
the study only names MoRA, Sec. II-B1):

    h = W0 x + s·f_decomp(M f_comp(x)),    r̂ = floor(sqrt((in + out)·r)),

so M has at most LoRA-r's (in + out)·r parameters (the paper's r̂ = ⌊√((d+k)r)⌋; the authors' code
rounds to the nearest integer instead, which can exceed LoRA's count by O(r̂); lorazoo keeps the
paper's floor, so MoRA never has more trainable parameters than LoRA-r, tested). The update is a
fixed linear function of M, so ΔW = s·D(M)·C exists and merges exactly.

Operators (``mora_type``), written with the authors' code (github.com/kongds/MoRA,
``peft-mora/src/peft/tuners/lora/layer.py``, ``_apply_mora`` and ``get_delta_weight``):

- ``truncation`` (paper Sec. 3, first option): f_comp(x) = x[:r̂], f_decomp(z) = [z; 0].
- ``sharing`` (paper Eq. 6, the code's ``mora_type=1``): x is extended to n = ceil(in/r̂)·r̂ entries
  by wrapping around (entry j reads x[j mod in], the code's ``cat([x, x[..., :pad]])``), cut into
  n/r̂ groups of r̂ and the groups are summed; the output repeats M f_comp(x) (entry o reads
  z[o mod r̂]). Rank ΔW <= r̂.
- ``decoupling`` (paper Sec. 3, the step before rotation; the code's type 6 without RoPE): the same n-entry extension cut into c = n/r̂ chunks, M applied to
  every chunk (ΔW block-diagonal, c copies of M), the c·r̂ outputs concatenated, cut to ``out`` or
  repeated up to it (entry o reads y[o mod n]). Rank ΔW up to min(in, out).
- ``rotation`` (paper Eq. 9, the code's ``mora_type=6``): decoupling with chunk i rotated first by
  RoPE's angles i·θ_k, θ_k = 10000^(-2k/r̂) (rotate-half form, as the code), so the blocks are
  M·R_i and no longer equal. r̂ is made even (floor to even, as the code's ``new_r // 2 * 2``).
- ``auto`` (the default): the authors' README recommends sharing "for large lora ranks" and rotation
  "for small lora ranks" (its examples: r = 8 with rotation, r = 128 pretraining with sharing), as
  sharing sums many inputs into one when groups are long.
  The code leaves the choice to the user; lorazoo decides by the shape in that spirit: sharing when
  every group holds at most 4 inputs (ceil(in/r̂) <= 4: r >= 128 on a 4096 x 4096 layer), rotation
  otherwise (r = 8 there gives 16 per group). The resolved type is ``form.mora_type``.

Where this goes beyond the code: when r̂ > in (tiny layers) the code's ``x[..., :pad]`` would be
too short; lorazoo wraps around as many times as needed (same formula j mod in). Init: M = 0 (the
code's ``nn.init.zeros_``), so the model starts as the base; the gradient of M is not zero, since
the operators are fixed. Scale: the code sets scaling = 1 and ignores alpha; the preset uses
``scale="constant", alpha=1`` for that, and any scale part still multiplies the update (rsLoRA...).
The DropLoRA rank mask acts on M's r̂ outputs (the values the decompression reads), the same mask
for every chunk. No plain factors: PiSSA-like inits, LoRA-Pro and ReLoRA are refused when the spec
is built; LoRA+ finds no up-projection and refuses when its parameter groups are made.

Cost: sharing/truncation cost tokens·r̂² per layer (about LoRA's tokens·r·(in + out)); decoupling and
rotation cost tokens·n·r̂ ≈ tokens·in·sqrt(2·d·r), e.g. 256/4096 = 6 % of the frozen layer's
matmul at d = 4096, r = 8, against LoRA's 0.4 % (and 18 % at the bench's d = 512): that is the
method (the authors' forward does the same matmul), not this implementation. The implementation
keeps the rest small: the scale and the rank mask are folded into the (r̂, r̂) matrix, not applied
to activations; extension and repetition are cat and slices (their backward is slicing, not a
scatter-add); rotation runs as one batched matmul over the c chunks with the blocks M·R_i built
from M each step (c·r̂² work) instead of rotating the (tokens x n) activations (as the code does).
Nothing of size (out, in) is formed while training; a merge assembles ΔW from the operators' index
maps (no (in, in) identity pushed through the forward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_choice
from ..registry import FORMS

MORA_TYPES = ("auto", "truncation", "sharing", "decoupling", "rotation")
SHARING_MAX_GROUP = 4  # auto: sharing when each of the r̂ groups holds at most this many inputs


def square_rank(in_features: int, out_features: int, rank: int, mora_type: str) -> int:
    """r̂ = floor(sqrt((in + out)·r)), floored to even (and at least 2) for ``rotation``."""
    r_hat = max(1, math.isqrt((in_features + out_features) * rank))
    if mora_type == "rotation":
        r_hat = max(2, r_hat - r_hat % 2)
    return r_hat


def resolve_type(in_features: int, out_features: int, rank: int, mora_type: str) -> str:
    """``auto`` -> sharing for short groups (ceil(in/r̂) <= 4), rotation otherwise."""
    if mora_type != "auto":
        return mora_type
    r_hat = square_rank(in_features, out_features, rank, "sharing")
    return "sharing" if -(-in_features // r_hat) <= SHARING_MAX_GROUP else "rotation"


def rope_tables(chunks: int, r_hat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (chunks, r̂) of RoPE's angles i·θ_k, θ_k = 10000^(-2k/r̂), halves repeated (the code's
    ``emb = cat((freqs, freqs))``), in float64."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat))
    freqs = torch.outer(torch.arange(chunks, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@FORMS.register("mora", paper="MoRA (Jiang et al., 2024, 'MoRA: High-Rank Updating for Parameter-Efficient "
                "Fine-Tuning') [46]",
                equations="MoRA Sec. 3: h = W0 x + s·f_decomp(M f_comp(x)), M (r̂, r̂), r̂ = floor(sqrt((in+out)·r)); "
                "truncation, sharing (Eq. 6), decoupling, rotation (Eq. 9)",
                summary="square high-rank matrix M between fixed compress/decompress operators; M zero at init")
class MoRA(Form):
    """h = W0 x + s·f_decomp(m ⊙ M f_comp(x)) (module docstring); ``self.rank`` is r̂."""

    options = {"mora_type": "auto"}
    plain_product = False
    rank_bound = "r̂ = floor(sqrt((in+out)·r)) for truncation/sharing; up to min(in, out) for decoupling/rotation"

    @classmethod
    def validate(cls, opts):
        check_choice("mora_type", opts["mora_type"], MORA_TYPES)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.lora_rank = rank
        self.mora_type = resolve_type(in_features, out_features, rank, opts.get("mora_type", "auto"))
        self.rank = r_hat = square_rank(in_features, out_features, rank, self.mora_type)
        self.chunks = -(-in_features // r_hat)          # c = ceil(in / r̂)
        self.padded = self.chunks * r_hat                # n = c·r̂
        self.M = nn.Parameter(torch.empty(r_hat, r_hat))
        if self.mora_type == "rotation":
            cos, sin = rope_tables(self.chunks, r_hat)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.M)

    # --- the operators ------------------------------------------------------------------------
    @staticmethod
    def _repeat(z: torch.Tensor, width: int) -> torch.Tensor:
        """(..., w) -> (..., width): entry j = z[j mod w] (cut when width <= w). Built with cat and
        slices, whose backward is slicing and adding (index_select's is a slow scatter-add on CPU)."""
        w = z.shape[-1]
        if width <= w:
            return z if width == w else z[..., :width]
        if width - w <= w:
            return torch.cat((z, z[..., :width - w]), dim=-1)
        return torch.cat([z] * -(-width // w), dim=-1)[..., :width]

    def effective(self, mask: torch.Tensor | None) -> torch.Tensor:
        """s·diag(m)·M: the mask on M's outputs and the scale folded into the (r̂, r̂) matrix, not
        applied to the (tokens x r̂) activations."""
        M = self.M * self.scale
        return M if mask is None else M * mask[:, None].to(M.dtype)

    def blocks(self, M: torch.Tensor | None = None) -> torch.Tensor:
        """The c diagonal blocks (c, r̂, r̂) of decoupling (M each) and rotation (M·R_i each)."""
        M = self.M if M is None else M
        if self.mora_type != "rotation":
            return M.expand(self.chunks, -1, -1)
        half = self.rank // 2
        MH = torch.cat((M[:, half:], -M[:, :half]), dim=1)  # M·H, H v = rotate_half(v)
        cos, sin = self.cos.to(M.dtype), self.sin.to(M.dtype)
        return M * cos[:, None, :] + MH * sin[:, None, :]  # M·(diag(cos_i) + diag(sin_i)·H)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """s·f_decomp(m ⊙ M f_comp(x)) for x (..., in) -> (..., out)."""
        r_hat, kind, M = self.rank, self.mora_type, self.effective(mask)
        if kind == "truncation":
            z = x[..., :r_hat] if self.in_features >= r_hat else F.pad(x, (0, r_hat - self.in_features))
            z = F.linear(z, M)
            if self.out_features <= r_hat:
                return z[..., :self.out_features]
            return F.pad(z, (0, self.out_features - r_hat))
        main, tail = self._split(x)
        if kind == "sharing":  # sum of the chunks; the sum keeps nothing for backward
            z = main.sum(-2) if tail is None else tail if main is None else main.sum(-2) + tail
            return self._repeat(F.linear(z, M), self.out_features)
        blocks = self.blocks(M) if kind == "rotation" else None
        parts = []
        if main is not None:
            if kind == "decoupling":  # M on every chunk: one matmul over (tokens·c) rows
                parts.append(F.linear(main, M))
            else:  # rotation: chunk i through its own block M·R_i, one batched matmul over the chunks
                full = main.shape[-2]
                z = torch.bmm(main.reshape(-1, full, r_hat).transpose(0, 1), blocks[:full].mT)
                parts.append(z.transpose(0, 1).reshape(*main.shape))
        if tail is not None:
            parts.append(F.linear(tail, M if kind == "decoupling" else blocks[-1]).unsqueeze(-2))
        z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)  # (..., c, r̂)
        return self._repeat(z.flatten(-2), self.out_features)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The extended input as its full chunks, a view of x (..., in // r̂, r̂) (None if there are
        none), and the last, wrapped chunk (..., r̂) (None when r̂ divides in). The chunks autograd
        keeps for M's gradient are then views of x, not a (tokens x n) copy per layer."""
        r_hat, fin = self.rank, self.in_features
        full = fin // r_hat
        main = x[..., :full * r_hat].unflatten(-1, (full, r_hat)) if full else None
        if self.padded == full * r_hat:
            return main, None
        rest = x[..., full * r_hat:]
        tail = self._repeat(x, r_hat) if not full else torch.cat((rest, x[..., :r_hat - rest.shape[-1]]), dim=-1)
        return main, tail

    def forward(self, x, y, weight, mask=None):
        return y + self.update(x, mask)

    def delta_weight(self, weight):
        """ΔW (out, in) = s·D M C, assembled from the operators' index maps (no (in, in) identity)."""
        out, fin, r_hat, kind = self.out_features, self.in_features, self.rank, self.mora_type
        M = self.M * self.scale
        dW = M.new_zeros(out, fin)
        if kind == "truncation":
            k, j = min(out, r_hat), min(fin, r_hat)
            dW[:k, :j] = M[:k, :j]
            return dW
        fold = torch.arange(self.padded, device=M.device) % fin  # extended column p is column p mod in
        rows = torch.arange(out, device=M.device)
        if kind == "sharing":  # row o reads M's row o mod r̂, column p reads M's column p mod r̂
            ext = M[rows % r_hat][:, torch.arange(self.padded, device=M.device) % r_hat]
        else:  # row o reads row q = o mod n of the block diagonal: block q // r̂, its row q mod r̂
            q = rows % self.padded
            ext = M.new_zeros(out, self.chunks, r_hat)
            ext[rows, q // r_hat] = self.blocks(M)[q // r_hat, q % r_hat]
            ext = ext.flatten(1)
        return dW.index_add_(1, fold, ext)
