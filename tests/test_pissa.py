"""PiSSA (study Eq. 90-92, [26]): W0 = U S Vᵀ; B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_rᵀ; base W0 - s·B·A."""
import pytest
import torch

import lorazoo
from lorazoo.registry import FORMS
from reference import column_signs
from tiny import TinyNet, adapted, layer_input, tiny_data

R, ALPHA = 3, 6.0
S_LORA = ALPHA / R  # s = alpha / r


def principal(W, r, s):
    """Eq. 90-92 in (out, in) layout: the reference factors and the residual, from a float64 SVD."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.sqrt(S[:r] / s)
    B, A = U[:, :r] * root, root[:, None] * Vh[:r]
    return B, A, W - s * B @ A


def check_factors(form, W0, base_now, s):
    B_ref, A_ref, residual = principal(W0, form.rank, s)
    sign = column_signs(form.B.detach(), B_ref)  # each singular pair (u_i, v_i) flips together
    torch.testing.assert_close(form.B.detach() * sign, B_ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(form.A.detach() * sign[:, None], A_ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(base_now, residual, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("layer", ["fc1", "fc2"])  # fc1 is 12 -> 16 (tall), fc2 square
def test_factors_and_residual_match_reference_svd(layer):
    W0 = getattr(TinyNet(), layer).weight.detach()
    model, _ = adapted(rank=R, alpha=ALPHA, init="pissa")
    lay = getattr(model, layer)
    check_factors(lay.adapters["default"].form, W0, lay.linear_weight().detach(), S_LORA)
    # the adapter holds exactly the principal part: s·B·A = U_r S_r V_rᵀ (Eckart-Young best rank r)
    U, S, Vh = torch.linalg.svd(W0)
    torch.testing.assert_close(lay.adapters["default"].form.delta_weight(W0), U[:, :R] * S[:R] @ Vh[:R],
                               rtol=1e-6, atol=1e-12)


def test_starts_as_base_and_delete_restores_base():
    x, _ = tiny_data()
    base = TinyNet()
    model, handle = adapted(rank=R, alpha=ALPHA, init="pissa")
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-6, atol=1e-12)
    handle.delete()
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12, msg=n)


def test_scale_is_accounted_for():
    """Same principal part s·B·A whatever alpha (and so s) is."""
    W0 = TinyNet().fc2.weight.detach()
    for alpha in (1.0, 32.0):
        model, _ = adapted(rank=R, alpha=alpha, init="pissa", scale="rslora")
        s = alpha / R ** 0.5
        check_factors(model.fc2.adapters["default"].form, W0, model.fc2.linear_weight().detach(), s)


def test_conv1d_uses_the_out_in_view():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv1D(8, 6)).double()  # weight stored (in=6, out=8)
    W0 = net[0].weight.detach().T.clone()
    x = layer_input(4, 6)
    out = net(x)
    lorazoo.adapt(net, lorazoo.AdapterSpec(rank=2, alpha=4, init="pissa", targets=["0"]))
    check_factors(net[0].adapters["default"].form, W0, net[0].linear_weight().detach(), 2.0)
    torch.testing.assert_close(net(x), out, rtol=1e-6, atol=1e-12)


def test_fast_svd_matches_exact_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(5)
    Q1, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    W0 = Q1[:, :16] * 2.0 ** -torch.arange(16.0, dtype=torch.float64) @ Q2.T  # like trained weights
    net = torch.nn.Sequential(torch.nn.Linear(16, 20)).double()
    with torch.no_grad():
        net[0].weight.copy_(W0)
    lorazoo.adapt(net, lorazoo.AdapterSpec(rank=3, alpha=3, init="pissa", pissa_niter=4, targets=["0"]))
    check_factors(net[0].adapters["default"].form, W0, net[0].linear_weight().detach(), 1.0)


def test_bad_niter_is_refused():
    with pytest.raises(lorazoo.SpecError, match="pissa_niter"):
        lorazoo.AdapterSpec(init="pissa", pissa_niter=-1)
    with pytest.raises(lorazoo.SpecError, match="pissa_niter"):
        lorazoo.AdapterSpec(init="pissa", pissa_niter=1.5)


@pytest.mark.skipif("dora" not in FORMS.names(), reason="no dora form")
def test_with_dora_starts_as_base():
    x, _ = tiny_data()
    model, _ = adapted("dora", rank=R, alpha=ALPHA, init="pissa")
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


def test_an_inactive_shifted_adapter_leaves_the_base_intact():
    """PiSSA's residual lives in the base weight; while its adapter is inactive (another one active,
    or none) the model must compute as the base, not as the residual."""
    x, _ = tiny_data()
    base = TinyNet()(x).logits
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec(rank=1, init="pissa", targets=["fc1", "fc2"]), name="pre")
    other = lorazoo.adapt(model, lorazoo.AdapterSpec(targets=["fc1", "fc2"]), name="fz")  # now the active one
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
    with other.disabled():
        torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
    lorazoo.activate(model)
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
    lorazoo.activate(model, "pre", "fz")
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
