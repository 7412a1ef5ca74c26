"""RaLoRA form: MeLoRA's block diagonal with a per-layer block count (study Eq. 14-15 and 54, [63]).

    ΔW = s·diag(B_1 A_1, ..., B_n A_n),   A_i (r, in_i), B_i (out_i, r)

is MeLoRA (forms/melora.py, reused here: same layout, init, batched forward and dense update); the
only difference is that n is chosen per layer by the ``ralora`` init from the effective rank of the
layer's calibration gradient (inits/ralora.py), so it is state of the form, not a spec option. It
is kept in a saved float buffer ``ralora_blocks`` (the file format stores floating-point tensors
only), so ``handle.save``/``lorazoo.load`` restore it with the factors; the tensors' shapes
(A (r, in), B (out, r)) do not depend on n, so LoRA-r's parameter count is kept for every n, as the
paper requires. The Python-side block sizes follow the buffer: they are re-read whenever the
buffer was written (a load copies into it in place, which bumps its version counter), so the
forward never synchronizes with the device otherwise.

Built without the ``ralora`` init (default init), every layer has one block: plain LoRA.
``rank`` is the rank of each block (the mini rank), as in MeLoRA; the update has rank up to n·r.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from ..registry import FORMS
from .melora import MeLoRA, block_sizes


@FORMS.register("ralora", paper="RaLoRA (Gradient Intrinsic Dimensionality Alignment, ICLR 2026) [63]",
                equations="study Eq. 14-15 with n per layer: ΔW = s·⊕_i B_i A_i, n blocks of rank r; "
                          "n set by the ralora init from erank(G) (Eq. 54)",
                summary="MeLoRA's block-diagonal mini LoRAs with a per-layer block count, saved with the adapter")
class RaLoRA(MeLoRA):
    """MeLoRA with ``n`` set per layer (``set_blocks``); see the module docstring."""

    options: dict = {}
    rank_bound = "n·r"

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, {"melora_blocks": 1}, ctx)
        self._seen = None
        self.register_buffer("ralora_blocks", torch.ones(()))
        self.set_blocks(1)

    @classmethod
    def validate(cls, opts):
        pass

    @classmethod
    def max_rank(cls, in_features, out_features):
        return min(in_features, out_features)

    @classmethod
    def rank_limit(cls, in_features, out_features, opts):
        return min(in_features, out_features)

    @property
    def blocks(self) -> int:
        self._sync()
        return self._blocks

    @blocks.setter
    def blocks(self, value):  # MeLoRA.__init__ assigns it; set_blocks is the way to change it
        self._blocks = int(value)

    @property
    def rank(self):
        self._sync()
        return self.blocks * self.block_rank

    @rank.setter
    def rank(self, value):  # Form/MeLoRA.__init__ assign it; it is derived from the blocks here
        pass

    def set_blocks(self, n: int) -> None:
        """Use ``n`` diagonal blocks (each of rank ``block_rank``); the factors keep their shapes."""
        n = int(n)
        if not 1 <= n or self.block_rank > min(self.in_features // n, self.out_features // n):
            raise SpecError(f"ralora: {n} blocks of rank {self.block_rank} do not fit a {self.out_features}x"
                            f"{self.in_features} layer (each block needs at least rank rows and columns)")
        with torch.no_grad():
            self.ralora_blocks.fill_(n)
        self._apply_blocks(n)

    def _apply_blocks(self, n: int) -> None:
        self._blocks = n
        self.in_sizes = block_sizes(self.in_features, n)
        self.out_sizes = block_sizes(self.out_features, n)
        self.even = self.in_features % n == 0 and self.out_features % n == 0
        self._seen = (id(self.ralora_blocks), self.ralora_blocks._version)

    def _sync(self) -> None:
        buf = self._buffers.get("ralora_blocks")
        if buf is not None and self._seen != (id(buf), buf._version):  # written by a load: re-read once
            self._apply_blocks(int(round(buf.item())))

    def forward(self, x, y, weight, mask=None):
        self._sync()
        return super().forward(x, y, weight, mask)

    def delta_weight(self, weight):
        self._sync()
        return super().delta_weight(weight)
