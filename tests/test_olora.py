"""OLoRA (study Eq. 95, [129]; PEFT init_lora_weights="olora"): W0 = Q R, B = Q[:, :r], A = R[:r, :],
base W0 - s·B·A, so the model starts as the base model."""
import math

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.registry import FORMS
from reference import column_signs
from tiny import TinyNet, adapted, layer_input, tiny_data

R, ALPHA = 3, 6.0
S_LORA = ALPHA / R


def check_factors(form, W0, base_now, s):
    """Reference QR in float64; each column of Q and the matching row of R flip sign together."""
    Q, Rm = torch.linalg.qr(W0)
    r = form.rank
    B_ref, A_ref = Q[:, :r], Rm[:r]
    sign = column_signs(form.B.detach(), B_ref)
    torch.testing.assert_close(form.B.detach() * sign, B_ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(form.A.detach() * sign[:, None], A_ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(base_now, W0 - s * B_ref @ A_ref, rtol=1e-6, atol=1e-12)


def wide(out_features=8, in_features=20, rank=R, **kw):
    """A wide layer (out < in): Q is (out, out), R (out, in)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(in_features, out_features)).double()
    W0 = net[0].weight.detach().clone()
    lorazoo.adapt(net, lorazoo.AdapterSpec(rank=rank, alpha=ALPHA, init="olora", targets=["0"], **kw))
    return net, W0


@pytest.mark.parametrize("layer", ["fc1", "fc2"])  # fc1 is 12 -> 16 (tall), fc2 square
def test_factors_and_shifted_base_match_reference_qr(layer):
    W0 = getattr(TinyNet(), layer).weight.detach()
    model, _ = adapted(rank=R, alpha=ALPHA, init="olora")
    lay = getattr(model, layer)
    check_factors(lay.adapters["default"].form, W0, lay.linear_weight().detach(), S_LORA)


def test_wide_layer_matches_reference_qr():
    net, W0 = wide()
    check_factors(net[0].adapters["default"].form, W0, net[0].linear_weight().detach(), S_LORA)


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_orthonormal_b_triangular_a_and_the_update_is_a_projection_of_w0(layer):
    W0 = getattr(TinyNet(), layer).weight.detach()
    model, _ = adapted(rank=R, alpha=ALPHA, init="olora")
    f = getattr(model, layer).adapters["default"].form
    B, A = f.B.detach(), f.A.detach()
    torch.testing.assert_close(B.T @ B, torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(torch.tril(A, diagonal=-1) == 0)  # rows of R: upper trapezoidal
    # sign-free: B·A = Q_r Q_rᵀ W0, the projection of W0 onto the span of its first r columns
    C = W0[:, :R]
    P = C @ torch.linalg.solve(C.T @ C, C.T)
    torch.testing.assert_close(f.delta_weight(W0), S_LORA * P @ W0, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(B @ A[:, :R], C, rtol=1e-6, atol=1e-12)  # W0's first r columns exactly


def test_starts_as_base_and_delete_restores_base():
    x, _ = tiny_data()
    base = TinyNet()
    model, handle = adapted(rank=R, alpha=ALPHA, init="olora")
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-6, atol=1e-12)
    handle.delete()
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12, msg=n)


def test_rslora_scales_the_shift_not_the_factors():
    """No 1/s on the factors (PEFT): B stays Q_r whatever the scale; the base shift carries s."""
    W0 = TinyNet().fc2.weight.detach()
    for alpha in (1.0, 32.0):
        model, _ = adapted(rank=R, alpha=alpha, init="olora", scale="rslora")
        check_factors(model.fc2.adapters["default"].form, W0, model.fc2.linear_weight().detach(),
                      alpha / math.sqrt(R))
    x, _ = tiny_data()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


@pytest.mark.skipif("dora" not in FORMS.names(), reason="no dora form")
def test_with_dora_starts_as_base_with_orthonormal_b():
    x, _ = tiny_data()
    model, _ = adapted("dora", rank=R, alpha=ALPHA, init="olora")
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)
    W0 = TinyNet().fc2.weight.detach()
    f = model.fc2.adapters["default"].form
    check_factors(f, W0, model.fc2.linear_weight().detach(), S_LORA)
    # m = ‖residual + s·B·A‖ = ‖W0‖ per row
    torch.testing.assert_close(f.m.detach(), W0.norm(dim=1), rtol=1e-6, atol=1e-12)
    x, y = tiny_data()
    model(x=x, labels=y).loss.backward()  # A, B and m all get a gradient at the first step
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in (f.A, f.B, f.m))


def test_conv1d_uses_the_out_in_view():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(8, 6)).double()  # weight stored (in=6, out=8)
    W0 = net[0].weight.detach().T.clone()
    x = layer_input(4, 6)
    out = net(x)
    lorazoo.adapt(net, lorazoo.AdapterSpec(rank=2, alpha=4, init="olora", targets=["0"]))
    check_factors(net[0].adapters["default"].form, W0, net[0].linear_weight().detach(), 2.0)
    torch.testing.assert_close(net(x), out, rtol=1e-6, atol=1e-12)


def test_float32_weights_get_a_float32_init_that_starts_as_base():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 24))
    x = torch.randn(5, 20)
    out = net(x)
    lorazoo.adapt(net, lorazoo.AdapterSpec(rank=4, init="olora", targets=["0"]))
    f = net[0].adapters["default"].form
    assert f.B.dtype == torch.float32
    torch.testing.assert_close(net(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", [f for f in ("vera", "loha", "lokr") if f in FORMS.names()])
def test_forms_without_plain_factors_are_refused(form):
    with pytest.raises(lorazoo.SpecError, match=rf"(?s)'olora'.*'{form}'"):
        lorazoo.AdapterSpec(form=form, init="olora")
