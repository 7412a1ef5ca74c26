"""VeRA: shared frozen random A, B; trainable scaling vectors d and b (Kopiczko et al. [48]; study Eq. 24-26)."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_number
from ..registry import FORMS


class VeraBank(nn.Module):
    """The frozen random pair shared by every layer of one adapter: A (r, max_in), B (max_out, r).

    Kaiming-uniform with gain sqrt(2) (He init: ``kaiming_uniform_`` with a = 0, leaky_relu), i.e.
    U(-sqrt(6/fan_in), sqrt(6/fan_in)) with fan_in = max_in for A and r for B, as PEFT's
    ``vera._kaiming_init`` (the paper: "Kaiming initialization"); not nn.Linear's a = sqrt(5),
    whose bound 1/sqrt(fan_in) is sqrt(6) times smaller. A then B from one generator seeded with
    the spec's seed (PEFT's ``projection_prng_key``), so the pair is reproducible; kept as buffers
    so state_dict and save/load hold it once.
    """

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A, B = torch.empty(rank, max_in), torch.empty(max_out, rank)
        nn.init.kaiming_uniform_(A, a=0, nonlinearity="leaky_relu", generator=g)
        nn.init.kaiming_uniform_(B, a=0, nonlinearity="leaky_relu", generator=g)
        self.register_buffer("A", A)
        self.register_buffer("B", B)


@FORMS.register("vera", paper="VeRA (Kopiczko et al., 2023) [48]",
                equations="study Eq. 24-26; VeRA Eq. 1: ΔW = s·Λ_b B Λ_d A, A, B shared, frozen, random",
                summary="shared frozen random A, B sliced per layer; trainable vectors d (r) and b (out)")
class VeRA(Form):
    """h = W0 x + s·Λ_b B[:out] Λ_d (m ⊙ A[:, :in] x) with Λ_d = diag(d), Λ_b = diag(b).

    A (r, max_in) and B (max_out, r) live in one bank per adapter (and rank), shared by every
    adapted layer and sliced to its shape (study Eq. 23-26). Trainable: d (r,), initialized to
    ``vera_d_init`` (0.1, the paper's default), and b (out,), zero, so ΔW = 0 at init.
    The rank mask acts on Λ_d A x. The rank may exceed the layer's shape (the bank has r rows
    whatever the layer; its paper uses r = 256 and more), up to 16·max(in, out); the update's rank is
    at most min(r, in, out).

    s comes from the scale part (study Eq. 26 writes alpha/r); the VeRA paper itself has no scale:
    ``scale="constant", alpha=1`` reproduces it exactly.
    """

    options = {"vera_d_init": 0.1}
    rank_bound = "min(r, in, out)"
    up_params = ("b",)  # the zero-init output-side vector (LoRA+ B group)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.bank_key = f"vera_r{rank}"
        self.use_bank(ctx, self.bank_key, lambda: VeraBank(rank, ctx.max_in, ctx.max_out, ctx.seed))
        self.d_init = float(opts.get("vera_d_init", 0.1))
        self.d = nn.Parameter(torch.empty(rank))
        self.b = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    @classmethod
    def validate(cls, opts):
        check_number("vera_d_init", opts["vera_d_init"], strict=True)

    @classmethod
    def max_rank(cls, in_features, out_features):
        """16·max(in, out): a bank row past min(in, out) no longer raises the update's rank, only the
        random features mixed into it; the bound keeps a typo (rank=10**9) from allocating the bank."""
        return 16 * max(in_features, out_features)

    @property
    def bank(self) -> VeraBank:
        return getattr(self, f"_bank_{self.bank_key}")

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.d.fill_(self.d_init)
            self.b.zero_()

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's frozen (B (out, r), A (r, in)) views of the shared bank."""
        bank = self.bank
        return bank.B[: self.out_features], bank.A[:, : self.in_features]

    def forward(self, x, y, weight, mask=None):
        B, A = self.sliced()
        h = self.rank_masked(F.linear(x, A) * self.d, mask)
        # b scales B's rows before the matmul: autograd then keeps h (tokens x r) for b's gradient,
        # not the (tokens x out) product that b ⊙ (B h) would keep.
        return y + F.linear(h, B * (self.b * self.scale)[:, None])

    def delta_weight(self, weight):
        B, A = self.sliced()
        return (self.b[:, None] * B) @ (self.d[:, None] * A) * self.scale

    def update_factors(self, weight):
        B, A = self.sliced()
        return (self.b * self.scale)[:, None] * B, self.d[:, None] * A
