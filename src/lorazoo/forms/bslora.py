"""BSLoRA: local, intra-layer shared and inter-layer shared LoRA parts (Zhou et al., ICML 2025 [52]).

Study Eq. 28-30: ΔW = s·(B_L A_L + T(B_S1 A_S1) + T(B_S2 A_S2)), s = 2 in the official code, where
(A_L, B_L) is the module's own rank-r pair, (A_S1, B_S1) is shared by the targeted modules of one
block (intra-layer, rank ``bslora_intra``) and (A_S2, B_S2) by all targeted modules (inter-layer,
rank ``bslora_inter``). The shared pairs have one shape for modules of different shapes; T fits
them to each module (``bslora_mode``), each module owning its transform's parameters:

- ``"kron"`` (Eq. 30, the authors' default): shared A (r_s, k), B (k, r_s), k =
  ``bslora_kron_size``; per module kernels K_A (1, ceil(in/k)), K_B (ceil(out/k), 1):
  T = (K_B ⊗ B)(K_A ⊗ A), i.e. A's copies along the input, each scaled by K_A's entry, and B's
  along the output.
- ``"gate"`` (Eq. 29): shared A (r_s, g), B (g, r_s), g = ``bslora_gate_size``; per module
  gates G_id (1, in), G_iu (g, 1), G_od (1, g), G_ou (out, 1): T = G_ou G_od B A G_iu G_id, a
  rank-one map (as the official code computes it: in -> 1 -> g -> r -> g -> 1 -> out).
- ``"slice"``: shared A (r_s, max in), B (max out, r_s) over all targets, the centre
  ``in`` columns / ``out`` rows taken (border (max - size)//2, as the official slice_forward).

Followed: the official code (yuhua-zhou/BSLoRA, ``peft/tuners/share_lora``): defaults r_local 2,
r_intra 4, r_inter 8, mode "kron", k = 256, g = 1024, fixed scale 2 (the preset sets
``scale="constant", alpha=2``; s comes from the scale part); init: every A (local, shared)
Kaiming-uniform a = sqrt(5) on its own fan-in, every B zero, kernels and gates Kaiming-uniform
a = sqrt(5) as the nn.Linear weights they are (K_A, G_id, G_od: bound 1/sqrt(fan-in); K_B, G_iu,
G_ou: fan-in 1, bound 1). So ΔW = 0 at init.

Choices:
- ``rank`` is r_local (each module's own part); ``self.rank`` = r_local + r_intra + r_inter, the
  hidden size rank masks act on (for the gate mode the mask enters the scalar G_od B m A G_iu).
- Blocks (intra-layer groups): the authors index decoder layers; lorazoo takes a target's path up
  to its first numeric part (``layers.3.mlp.up`` -> ``layers.3``); targets without one form one
  block (then intra- and inter-layer parts share alike).
- kron with k not dividing in (out): ceil(in/k) copies, cut to in (the official code needs
  divisibility). k larger than a layer keeps one copy cut to the layer.
- LoRAFactory's port (the study's code) differs in two details: its slice takes the leading
  in/out entries rather than the centre, and one ``bslora_share_size`` serves kron and gate;
  lorazoo keeps the official code's centre and two sizes. Its gate folds the gates into A and B
  (A G_ad G_au, G_bu G_bd B), the same rank-one update as here.
- gate computed exactly but cheaply: the shared path is the scalar c = G_od B A G_iu (per step)
  times G_ou G_id x, so the forward costs tokens·(in + out), not tokens·g.
- All parts run as one pair of matmuls: the local, intra and inter factors (after T) are
  concatenated along the rank, A_cat (R, in) and B_cat (out, R) with R = r_l + r_i + r_e (kron,
  slice) or r_l + 2 (gate); the (out, in) update is never formed in a forward.
- Trainable parameters (tested): per module r_l(in + out) + transforms (kron: Σ_parts ceil(in/k) +
  ceil(out/k); gate: Σ_parts in + 2g + out); per block r_i(k_in + k_out); once r_e(k_in + k_out),
  with (k_in, k_out) = (k, k), (g, g) or (max in, max out).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_choice, check_number
from ..registry import FORMS
from .sharelora import SharedFactors

MODES = {"kron": "Kronecker kernels (Eq. 30)", "gate": "rank-one gates (Eq. 29)", "slice": "centre slices"}


def block_of(path: str) -> str:
    """The block (intra-layer group) of a target: its path up to the first numeric part, or "all"."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return re.sub(r"\W", "_", ".".join(parts[: i + 1]))
    return "all"


def _uniform(t: torch.Tensor, fan_in: int) -> None:
    """Kaiming-uniform a = sqrt(5) for an nn.Linear weight of this fan-in: U(±1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    t.uniform_(-bound, bound)


@FORMS.register("bslora", paper="BSLoRA (Zhou et al., ICML 2025) [52]",
                equations="study Eq. 28-30: ΔW = s·(B_L A_L + T(B_S1 A_S1) + T(B_S2 A_S2)); "
                          "T_k = (K_B ⊗ B)(K_A ⊗ A), T_g = G_ou G_od B A G_iu G_id, or centre slices",
                summary="local LoRA + a pair shared within each block + a pair shared by all layers, fitted "
                        "to each module by Kronecker kernels, rank-one gates or slices")
class BSLoRA(Form):
    """h = W0 x + s·(B_L A_L + T(B_S1 A_S1) + T(B_S2 A_S2)) x; see the module docstring."""

    options = {"bslora_intra": 4, "bslora_inter": 8, "bslora_mode": "kron", "bslora_kron_size": 256,
               "bslora_gate_size": 1024}
    plain_product = False  # shared parts: factor inits, LoRA-Pro and ReLoRA refuse it
    rank_bound = "r_local + r_intra + r_inter (kron, slice); r_local + 2 (gate)"

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.r_local = rank
        self.mode = opts.get("bslora_mode", "kron")
        ranks = {"intra": int(opts.get("bslora_intra", 4)), "inter": int(opts.get("bslora_inter", 8))}
        self.shared_parts = [p for p in ("intra", "inter") if ranks[p] > 0]
        self.ranks = ranks
        self.rank = rank + sum(ranks[p] for p in self.shared_parts)  # the hidden size rank masks act on
        if self.mode == "kron":
            k = int(opts.get("bslora_kron_size", 256))
            share_in = share_out = k
        elif self.mode == "gate":
            share_in = share_out = int(opts.get("bslora_gate_size", 1024))
        else:
            share_in, share_out = ctx.max_in, ctx.max_out
        self.share_in, self.share_out = share_in, share_out
        self.bank_keys = {}
        for part in self.shared_parts:
            where = block_of(ctx.path) if part == "intra" else "model"
            key = f"bslora_{part}_{self.mode}_r{ranks[part]}_{where}"
            self.use_bank(ctx, key, lambda r=ranks[part]: SharedFactors(r, share_in, share_out, "AB"))
            self.bank_keys[part] = key
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        if self.mode == "kron":
            self.copies_in, self.copies_out = math.ceil(in_features / share_in), math.ceil(out_features / share_out)
            for part in self.shared_parts:
                setattr(self, f"K_{part}_A", nn.Parameter(torch.empty(self.copies_in)))
                setattr(self, f"K_{part}_B", nn.Parameter(torch.empty(self.copies_out)))
        elif self.mode == "gate":
            for part in self.shared_parts:
                for name, size in (("id", in_features), ("iu", share_in), ("od", share_out), ("ou", out_features)):
                    setattr(self, f"G_{part}_{name}", nn.Parameter(torch.empty(size)))
        else:
            self.border_in, self.border_out = (share_in - in_features) // 2, (share_out - out_features) // 2
        self.up_params = ("B", *(f"_bank_{k}.B" for k in self.bank_keys.values()))
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_number("bslora_intra", opts["bslora_intra"], integer=True)
        check_number("bslora_inter", opts["bslora_inter"], integer=True)
        check_choice("bslora_mode", opts["bslora_mode"], MODES)
        check_number("bslora_kron_size", opts["bslora_kron_size"], minimum=1, integer=True)
        check_number("bslora_gate_size", opts["bslora_gate_size"], minimum=1, integer=True)

    def bank(self, part: str) -> SharedFactors:
        return getattr(self, f"_bank_{self.bank_keys[part]}")

    def reset_parameters(self) -> None:
        """As the official code: local A Kaiming-uniform, B zero; kernels and gates as nn.Linear weights."""
        with torch.no_grad():
            _uniform(self.A, self.in_features)
            self.B.zero_()
            for part in self.shared_parts:
                if self.mode == "kron":  # sampler_A: Linear(in/k, 1), sampler_B: Linear(1, out/k)
                    _uniform(getattr(self, f"K_{part}_A"), self.copies_in)
                    _uniform(getattr(self, f"K_{part}_B"), 1)
                elif self.mode == "gate":  # gates: Linear(in, 1), Linear(1, g), Linear(g, 1), Linear(1, out)
                    for name, fan in (("id", self.in_features), ("iu", 1), ("od", self.share_out), ("ou", 1)):
                        _uniform(getattr(self, f"G_{part}_{name}"), fan)

    def _shared(self, part: str, mask: torch.Tensor | None):
        """This module's (B (out, h), A (h, in), mask (h,) or None) for a shared part after T."""
        bank = self.bank(part)
        if self.mode == "kron":  # K ⊗ A: copy j of A scaled by K_A[j], along the input; cut to the layer
            KA, KB = getattr(self, f"K_{part}_A"), getattr(self, f"K_{part}_B")
            r = bank.A.shape[0]
            A = (KA[:, None] * bank.A[:, None, :]).reshape(r, -1)[:, : self.in_features]
            B = (KB[:, None, None] * bank.B[None]).reshape(-1, r)[: self.out_features]
            return B, A, mask
        if self.mode == "slice":
            A = bank.A[:, self.border_in: self.border_in + self.in_features]
            B = bank.B[self.border_out: self.border_out + self.out_features]
            return B, A, mask
        g = {n: getattr(self, f"G_{part}_{n}") for n in ("id", "iu", "od", "ou")}
        h = bank.A @ g["iu"]  # (r,)
        c = g["od"] @ (bank.B @ (h if mask is None else h * mask))  # the scalar G_od B m A G_iu
        return (c * g["ou"])[:, None], g["id"][None, :], None

    def stacked(self, mask: torch.Tensor | None = None):
        """(B_cat (out, R), A_cat (R, in), mask_cat): local then intra then inter ranks."""
        Bs, As, masks = [self.B], [self.A], [None if mask is None else mask[: self.r_local]]
        start = self.r_local
        for part in self.shared_parts:
            r = self.ranks[part]
            B, A, m = self._shared(part, None if mask is None else mask[start: start + r])
            start += r
            Bs.append(B)
            As.append(A)
            masks.append(m if m is not None or mask is None else torch.ones(A.shape[0], dtype=mask.dtype,
                                                                             device=mask.device))
        mask_cat = None if mask is None else torch.cat(masks)
        return torch.cat(Bs, dim=1), torch.cat(As, dim=0), mask_cat

    def forward(self, x, y, weight, mask=None):
        B, A, m = self.stacked(mask)
        return y + F.linear(self.rank_masked(F.linear(x, A), m) * self.scale, B)

    def delta_weight(self, weight):
        B, A, _ = self.stacked()
        return (B @ A) * self.scale
