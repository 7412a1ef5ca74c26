"""MiLoRA (study Eq. 93-94, [78]): the adapter takes the r smallest singular triplets of W0,
B = U[:, -r:] sqrt(S[-r:]/s), A = sqrt(S[-r:]/s) V[:, -r:]ᵀ; the base keeps W0 - s·B·A."""
import pytest
import torch

import lorazoo
from reference import column_signs
from tiny import TinyNet, adapted, tiny_data

R, ALPHA = 3, 6.0
S_LORA = ALPHA / R


@pytest.mark.parametrize("layer", ["fc1", "fc2"])  # fc1 12 -> 16: only 12 singular values
def test_factors_and_residual_match_reference_svd(layer):
    W0 = getattr(TinyNet(), layer).weight.detach()
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    root = torch.sqrt(S[-R:] / S_LORA)
    B_ref, A_ref = U[:, -R:] * root, root[:, None] * Vh[-R:]
    model, _ = adapted(rank=R, alpha=ALPHA, init="milora")
    lay = getattr(model, layer)
    form = lay.adapters["default"].form
    sign = column_signs(form.B.detach(), B_ref)
    torch.testing.assert_close(form.B.detach() * sign, B_ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(form.A.detach() * sign[:, None], A_ref, rtol=1e-6, atol=1e-12)
    # the frozen base keeps the principal part: W0 - U_-r S_-r V_-rᵀ = U_:n-r S V_:n-rᵀ
    n = S.shape[0]
    torch.testing.assert_close(lay.linear_weight().detach(), U[:, :n - R] * S[:n - R] @ Vh[:n - R],
                               rtol=1e-6, atol=1e-12)


def test_minor_not_principal():
    """The adapter's update is the smallest part of W0: its norm is the tail of the spectrum."""
    W0 = TinyNet().fc2.weight.detach()
    S = torch.linalg.svdvals(W0)
    model, _ = adapted(rank=R, alpha=ALPHA, init="milora")
    dw = model.fc2.adapters["default"].form.delta_weight(W0)
    torch.testing.assert_close(torch.linalg.svdvals(dw)[:R], S[-R:], rtol=1e-6, atol=1e-12)


def test_starts_as_base_and_delete_restores_base():
    x, _ = tiny_data()
    base = TinyNet()
    model, handle = adapted(rank=R, alpha=ALPHA, init="milora")
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-6, atol=1e-12)
    handle.delete()
    torch.testing.assert_close(model.fc2.weight, base.fc2.weight, rtol=1e-6, atol=1e-12)


def test_has_no_fast_svd_option():
    with pytest.raises(lorazoo.SpecError, match="pissa_niter"):
        lorazoo.AdapterSpec(init="milora", pissa_niter=4)
