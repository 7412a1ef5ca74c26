"""LoDA / LoDA+ (Liu et al. [75]; study Eq. 85): f1(z) = σ(M2 σ(M1 σ(z))), z = A x, σ = LeakyReLU(0.8);
LoDA s·B(z + f1(z)), LoDA+ s·(B z + σ(B f1(z)))."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, perturb, single_layer, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def _leaky(v, slope=0.8):
    return torch.where(v >= 0, v, slope * v)


def reference(f, x, plus, mask=None):
    """Token by token, with explicit matrix-vector products."""
    A, B, M1, M2 = (t.detach() for t in (f.A, f.B, f.M1, f.M2))
    m = torch.ones(A.shape[0], dtype=torch.float64) if mask is None else mask
    rows = []
    for t in range(x.shape[0]):
        z = A @ x[t]
        f1 = _leaky(M2 @ _leaky(M1 @ _leaky(z)))
        if plus:
            rows.append(f.scale * (B @ (m * z)) + f.scale * _leaky(B @ (m * f1)))
        else:
            rows.append(f.scale * (B @ (m * (z + f1))))
    return torch.stack(rows)


@pytest.mark.parametrize("plus", [False, True])
def test_matches_reference(plus):
    model, handle, layer = single_layer("loda", rank=3, alpha=6, loda_plus=plus)
    perturb(handle, scale=0.5)
    f = _form(layer)
    x = layer_input(features=20)
    expected = x @ layer.base.weight.detach().T + layer.base.bias.detach() + reference(f, x, plus)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("plus", [False, True])
def test_rank_mask_on_what_B_reads(plus):
    model, handle, layer = single_layer("loda", rank=3, loda_plus=plus)
    perturb(handle, scale=0.5)
    f = _form(layer)
    mask = torch.tensor([0.0, 3.0, 3.0], dtype=torch.float64)
    x, y = layer_input(features=20), layer_input(features=24, seed=4)
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), y + reference(f, x, plus, mask),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("plus", [False, True])
def test_starts_as_base_and_contains_lora(plus):
    x, labels = tiny_data(16)
    model, handle = adapted("loda", rank=4, loda_plus=plus)
    out = model(x=x, labels=labels)
    torch.testing.assert_close(out.logits, TinyNet()(x).logits, rtol=0, atol=0)
    out.loss.backward()
    f = model.fc2.adapters["default"].form
    assert f.B.grad.abs().sum() > 0
    # M1 = M2 = 0 gives f1 = 0: LoDA(+) is LoRA with the same A, B
    perturb(handle)
    with torch.no_grad():
        f.M1.zero_()
        f.M2.zero_()
    xl = layer_input(features=16)
    torch.testing.assert_close(f.delta(xl, None), f.scale * xl @ (f.B @ f.A).T.detach(), rtol=1e-10, atol=1e-12)


def test_nonlinear_in_x_and_not_mergeable():
    model, handle, layer = single_layer("loda", rank=3, loda_plus=True)
    perturb(handle, scale=0.5)
    f = _form(layer)
    x = layer_input(features=20)
    assert not torch.allclose(f.delta(-x, None), -f.delta(x, None))
    with pytest.raises(lorazoo.NotMergeableError):
        handle.merge()


def test_preset_is_loda_plus_and_refusals():
    assert lorazoo.AdapterSpec.preset("loda").options["loda_plus"] is True
    with pytest.raises(lorazoo.SpecError, match="loda_plus"):
        lorazoo.AdapterSpec(form="loda", loda_plus=1)
    with pytest.raises(lorazoo.SpecError, match="loda_negative_slope"):
        lorazoo.AdapterSpec(form="loda", loda_negative_slope=-0.1)
    with pytest.raises(lorazoo.SpecError, match="loda"):
        lorazoo.AdapterSpec(form="loda", init="pissa")
    with pytest.raises(lorazoo.SpecError, match="lora_pro"):
        lorazoo.AdapterSpec(form="loda", optim="lora_pro")


@pytest.mark.parametrize("plus", [False, True])
def test_gradients_match_autograd_of_the_reference(plus):
    model, handle, layer = single_layer("loda", rank=3, loda_plus=plus)
    perturb(handle, scale=0.5)
    f = _form(layer)
    x = layer_input(features=20)
    g = layer_input(features=24, seed=8)
    (f.delta(x, None) * g).sum().backward()
    got = [p.grad.clone() for p in (f.A, f.B, f.M1, f.M2)]
    for p in (f.A, f.B, f.M1, f.M2):
        p.grad = None
    params = [p.detach().clone().requires_grad_() for p in (f.A, f.B, f.M1, f.M2)]
    A, B, M1, M2 = params
    lk = lambda v: torch.nn.functional.leaky_relu(v, 0.8)  # noqa: E731
    z = x @ A.T
    f1 = lk(lk(lk(z) @ M1.T) @ M2.T)
    out = f.scale * (z @ B.T + lk(f1 @ B.T)) if plus else f.scale * ((z + f1) @ B.T)
    (out * g).sum().backward()
    for a, p in zip(got, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)
