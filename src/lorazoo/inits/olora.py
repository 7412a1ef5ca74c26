"""OLoRA: orthonormal B from the QR decomposition of the pretrained weight (study Eq. 95, [129]).

With the frozen weight W0 (out, in) = Q R (reduced QR, Q orthonormal columns, R upper trapezoidal):

    B = Q[:, :r]   (out, r), orthonormal columns     A = R[:r, :]   (r, in)
    base  W0 <- W0 - s·B·A   (through ``Adapter.shift_base``)

so the model starts exactly as the base model. This is the OLoRA author's own implementation in PEFT
(``init_lora_weights="olora"``: ``Q, R = torch.linalg.qr(weight)``, lora_B = Q[:, :r], lora_A = R[:r],
``weight -= scaling * lora_B @ lora_A``), which the study's code repeats. Choices, following it:
- no 1/s on the factors (unlike PiSSA's code): B stays exactly orthonormal, the paper's point;
  the base shift carries the scale, so s·B·A = s·Q_r Q_rᵀ W0 (s times the projection of W0 onto the
  span of its first r columns) moves out of the base whatever alpha, r and the scale part are.
- the QR is of the weight in torch's (out, in) layout (nn.Linear.weight; the (out, in) view for
  HF Conv1D), as PEFT does. The study writes Eq. 95 in its transposed convention (W̃ = Q R with
  A0 = Q[:, :r] on its input side); read literally there it would be the QR of W0ᵀ. We follow the
  OLoRA paper and its code.
- the decomposition runs in at least float32 (float64 stays float64); QR's column signs are
  LAPACK's (Householder), as in PEFT: each column of Q and the matching row of R may both be flipped.
"""
from __future__ import annotations

import torch

from ..parts import Init
from ..registry import INITS
from .calibration import work_dtype
from .svd import set_factors


@INITS.register("olora", paper="OLoRA (Büyükakyüz, 2024) [129]",
                equations="study Eq. 95: W0 = Q R, B = Q[:, :r], A = R[:r, :], base W0 - s·B·A "
                          "(PEFT init_lora_weights='olora')",
                summary="orthonormal B and upper-trapezoidal A from the QR of W0, moved out of the base: "
                        "starts as the base")
class OLoRA(Init):
    """OLoRA: B = Q_r (orthonormal), A = R_r, base W0 - s·B·A."""

    def apply(self, path, adapter, layer, weight):
        r = adapter.form.rank
        Q, R = torch.linalg.qr(weight.detach().to(work_dtype(weight.dtype)))
        set_factors(adapter, weight, Q[:, :r], R[:r], shift=True)
