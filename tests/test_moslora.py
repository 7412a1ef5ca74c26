"""MoSLoRA (Wu et al. 2024 [92]): ΔW = (alpha/r)·B M A, M an r x r trainable mixer, B zero at init."""
import math

import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, single_layer


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def _dense(f, mask=None):
    m = torch.ones(f.rank, dtype=torch.float64) if mask is None else mask
    return torch.einsum("or,rk,k,ki->oi", f.B.detach(), f.M.detach(), m, f.A.detach())


def test_matches_dense_reference():
    model, handle = adapted("moslora", rank=4, alpha=6)
    perturb(handle)
    layer, f = model.fc2, _form(model)
    x = layer_input()
    ref = x @ (layer.base.weight.detach() + (6 / 4) * _dense(f)).T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)


def test_init_b_zero_mixer_kaiming_and_zero_update():
    model, handle = adapted("moslora", rank=4)
    f = _form(model)
    assert torch.count_nonzero(f.B) == 0
    assert torch.count_nonzero(f.delta_weight(model.fc2.linear_weight())) == 0
    bound = 1 / math.sqrt(4)  # Kaiming-uniform with a = sqrt(5) on fan_in = r, as nn.Linear(r, r)
    assert f.M.abs().max() <= bound and f.M.abs().max() > 0.5 * bound
    assert not torch.allclose(f.M, torch.eye(4, dtype=f.M.dtype))


def test_orthogonal_mixer_option_and_bad_value():
    model, _ = adapted("moslora", rank=4, moslora_mixer_init="orthogonal")
    M = _form(model).M.detach()
    torch.testing.assert_close(M @ M.T, torch.eye(4, dtype=M.dtype), rtol=0, atol=1e-6)
    with pytest.raises(lorazoo.SpecError, match="moslora_mixer_init"):
        lorazoo.AdapterSpec(form="moslora", moslora_mixer_init="eye")


def test_mixer_trains_and_rank_is_bounded_by_r():
    model, handle = adapted("moslora", rank=3)
    perturb(handle)
    f = _form(model)
    model(layer_input(features=12)).logits.sum().backward()
    assert torch.count_nonzero(f.M.grad) > 0
    assert torch.linalg.matrix_rank(f.delta_weight(model.fc2.linear_weight())) <= 3


def test_pissa_init_starts_at_base_with_identity_mixer():
    x = layer_input(features=12)
    base = TinyNet()(x).logits
    model, handle = adapted("moslora", rank=4, init="pissa")
    f = _form(model)
    torch.testing.assert_close(f.M.detach(), torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
    ad = model.fc2.adapters["default"]
    W0 = model.fc2.base.weight.detach() - ad.shift_B @ ad.shift_A  # the pristine weight
    U, S, Vh = torch.linalg.svd(W0)
    torch.testing.assert_close(f.delta_weight(W0), U[:, :4] * S[:4] @ Vh[:4], rtol=1e-6, atol=1e-9)


def test_factor_init_hook_reduces_to_lora():
    model, handle = adapted("moslora", rank=4, alpha=8)
    perturb(handle)
    f = _form(model)
    B, A = f.factors()
    assert B is f.B and A is f.A
    f.after_factor_init(model.fc2.linear_weight())  # what a factor init (PiSSA...) triggers
    torch.testing.assert_close(f.M.detach(), torch.eye(4, dtype=torch.float64))
    dW = f.delta_weight(model.fc2.linear_weight())
    torch.testing.assert_close(dW, 2 * B.detach() @ A.detach(), rtol=1e-6, atol=1e-12)


def test_rank_mask_acts_before_the_mixer():
    model, handle = adapted("moslora", rank=4, alpha=4)
    perturb(handle)
    layer, f = model.fc2, _form(model)
    x, y = layer_input(), layer_input(seed=5)
    mask = torch.tensor([2.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    ref = y + x @ _dense(f, mask).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=0)


def test_forward_never_forms_the_update():
    model, handle, layer = single_layer("moslora", rank=3)
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None)
                       .sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes and f.M.grad is not None
    assert (24, 20) in op_shapes(lambda: f.delta_weight(layer.linear_weight()))
