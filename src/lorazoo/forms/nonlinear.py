"""Shared base of the nonlinear LoRA forms (Aurora, LoRAN): LoRA's factors with a nonlinearity in the update.

Both keep LoRA's A (r, in), Kaiming-uniform, and B (out, r), zero, and put a fixed or learnable
nonlinearity into the update, in one of two places:

- :class:`HiddenNonlinear`, between the factors: h = W0 x + s·B(m ⊙ φ(A x)), φ acting on the
  (tokens x r) rank activations (Aurora; LoDA, forms/loda.py, whose LoDA+ adds σ after B). The update depends on x nonlinearly, so there is no weight
  ΔW: merging is refused with NotMergeableError. The cost over LoRA is φ on (tokens x r) values.
- on the entries of the product (LoRAN, forms/loran.py): ΔW = s·f(B diag(m) A), a fixed (out, in)
  matrix, mergeable, but dense: f has no factored form. :class:`EntrywiseNonlinear` is this case for
  any f (SineLoRA, forms/sinelora.py; LoRAN); as a :class:`~lorazoo.forms.dense.DenseForm` it recomputes
  B·A in backward, so no (out, in) tensor is kept per layer between forward and backward.

What they share, and why it is here once:

- B = 0 at init, so the update starts at zero (B·anything = 0; LoRAN's f has f(0) = 0).
- The factors are not offered as plain B·A (``factors`` is Form's, ``plain_product`` False): inits that
  choose B, A so that s·B·A is a given matrix moved out of the base (PiSSA, MiLoRA, LoRA-GA, CorDA)
  would not start from the base any more once the nonlinearity acts, so ``Init.check_form`` refuses
  them when the spec is built. EVA, which sets A only and leaves B = 0, reaches A through the same
  ``factors()`` and is refused with them. LoRA-Pro's gradient rule and ReLoRA's merges through B·A
  refuse these forms too. LoRA+ finds B through ``up_params``.
- The DropLoRA rank mask m (Bernoulli(1-p)/(1-p) over the rank) sits where the rank dimension is.
  For Aurora after φ, on the r values B reads: dropout on the hidden layer of the A-φ-B "MLP", which
  is how DropLoRA's Sec. 3 describes its mask; the masked update is then unbiased, E[B(m ⊙ φ)] = Bφ,
  whereas a mask before φ would feed φ zeros and 1/(1-p)-inflated inputs. For LoRAN inside the
  product, DropLoRA's (B ⊙ M)(M ⊙ A), the only place the rank exists; unbiased up to Sinter's
  a·z·sin(ωz) term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NotMergeableError
from ..parts import Form
from .dense import DenseForm
from .lora import LoRA


class NonlinearLoRA(LoRA):
    """LoRA's A, B and init, with the factors hidden from factor inits (the update is not s·B·A)."""

    factors = Form.factors  # no plain additive s·B·A: PiSSA & co. refused at spec time
    plain_product = False
    up_params = ("B",)  # the zero-init up-projection (LoRA+ fast group)


class HiddenNonlinear(NonlinearLoRA):
    """h = W0 x + s·B(m ⊙ φ(A x)) for a nonlinearity φ: R^r -> R^r applied per token.

    Subclasses define :meth:`phi` on (..., r) activations. Not mergeable: the update is a nonlinear
    function of x, no (out, in) matrix equals it.
    """

    mergeable = False
    rank_bound = "r (the update of every input lies in the column space of B)"

    def phi(self, h: torch.Tensor) -> torch.Tensor:
        """The nonlinearity on the rank activations h = A x, (..., r) -> (..., r)."""
        raise NotImplementedError

    def delta(self, x, mask):
        hidden = self.rank_masked(self.phi(F.linear(x, self.A)), mask)
        return F.linear(hidden * self.scale, self.B)  # s on (tokens x r), not on (tokens x out)

    def delta_weight(self, weight):
        raise NotMergeableError(
            f"form '{self.part_name}' has no weight update ΔW: its update s·B·φ(A x) depends on the "
            f"input x through the nonlinearity φ, so it cannot be folded into the base weight; keep it "
            f"unmerged")


class EntrywiseNonlinear(DenseForm, NonlinearLoRA):
    """ΔW = s·f(B diag(m) A) for an entrywise f with f(0) = 0 (Sine-LoRA, LoRAN).

    Mergeable: ΔW does not depend on x. Dense: f(BA) has no factored form, so the forward forms the
    (out, in) update once per step (forms/dense.py: nothing of size (out, in) is kept for backward).
    The DropLoRA rank mask acts inside the product, DropLoRA's (B ⊙ M)(M ⊙ A). Subclasses define
    :meth:`entrywise` f and :meth:`entrywise_slope` f'.
    """

    mergeable = True
    rank_bound = "min(in, out) (f acts on the entries of B·A)"

    def entrywise(self, P: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def entrywise_slope(self, P: torch.Tensor) -> torch.Tensor:
        """f'(P), entrywise."""
        raise NotImplementedError

    def dense_update(self, weight, P):
        return self.entrywise(P) * self.scale

    def dense_slope(self, weight, P):
        return self.entrywise_slope(P) * self.scale
