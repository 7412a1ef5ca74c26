"""Sine-LoRA (Ji et al. 2025 [73]): ΔW = s·sin(ω·B A)/g, g = sqrt(in) (authors' sinlora.py)."""
import math

import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, perturb, single_layer, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def _reference(f, omega, gain, scale, mask=None):
    B, A = f.B.detach(), f.A.detach()
    P = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for k in range(A.shape[0]):  # B diag(m) A as a sum of rank-one terms
        P += (1.0 if mask is None else mask[k]) * torch.outer(B[:, k], A[k])
    return scale * torch.sin(omega * P) / gain


def test_matches_dense_reference_and_merges():
    model, handle, layer = single_layer("sinelora", in_features=20, out_features=24, rank=3, alpha=6)
    perturb(handle, scale=0.05)
    f = _form(layer)
    ref = _reference(f, 200.0, math.sqrt(20), 2.0)
    x = layer_input(features=20)
    torch.testing.assert_close(f.delta_weight(layer.linear_weight()), ref, rtol=1e-10, atol=1e-12)
    out = layer(x)
    torch.testing.assert_close(out, x @ (layer.base.weight.detach() + ref).T + layer.base.bias.detach(),
                               rtol=1e-10, atol=1e-12)
    handle.merge()
    torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-12)


def test_options_frequency_and_gain():
    model, handle, layer = single_layer("sinelora", rank=2, sinelora_frequency=3.0, sinelora_gain=0.5)
    perturb(handle)
    f = _form(layer)
    torch.testing.assert_close(f.delta_weight(layer.linear_weight()), _reference(f, 3.0, 0.5, f.scale),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_autograd_of_the_formula(masked):
    model, handle, layer = single_layer("sinelora", rank=3, sinelora_frequency=7.0)
    perturb(handle, scale=0.2)
    f = _form(layer)
    mask = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64) if masked else None
    m = torch.ones(3, dtype=torch.float64) if mask is None else mask
    x = layer_input(features=20).requires_grad_()
    g = layer_input(features=24, seed=9)
    (f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), mask) * g).sum().backward()
    got = (x.grad.clone(), f.A.grad.clone(), f.B.grad.clone())
    A, B = f.A.detach().clone().requires_grad_(), f.B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ((x2 @ (f.scale * torch.sin(7.0 * (B * m) @ A) / math.sqrt(20)).T) * g).sum().backward()
    for a, b in zip(got, (x2.grad, A.grad, B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_starts_as_base_and_update_is_full_rank():
    x, _ = tiny_data(16)
    model, handle = adapted("sinelora", rank=1)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)
    perturb(handle, scale=0.3)
    dW = model.fc2.adapters["default"].form.delta_weight(model.fc2.linear_weight())
    assert torch.linalg.matrix_rank(dW) > 1  # sin(ω B A) of a rank-1 B A: the paper's rank increase


def test_rank_mask_inside_the_product():
    model, handle, layer = single_layer("sinelora", rank=3)
    perturb(handle, scale=0.05)
    f = _form(layer)
    mask = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64)
    x, y = layer_input(features=20), layer_input(features=24, seed=5)
    ref = y + x @ _reference(f, 200.0, math.sqrt(20), f.scale, mask).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-10, atol=1e-12)


def test_refusals():
    with pytest.raises(lorazoo.SpecError, match="sinelora_frequency"):
        lorazoo.AdapterSpec(form="sinelora", sinelora_frequency=0.0)
    with pytest.raises(lorazoo.SpecError, match="sinelora_gain"):
        lorazoo.AdapterSpec(form="sinelora", sinelora_gain=-1.0)
    with pytest.raises(lorazoo.SpecError, match="sinelora"):
        lorazoo.AdapterSpec(form="sinelora", init="pissa")
    with pytest.raises(lorazoo.SpecError, match="lora_pro"):
        lorazoo.AdapterSpec(form="sinelora", optim="lora_pro")
