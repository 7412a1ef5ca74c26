"""RPLoRA ([66]; study Eq. 65-67): g_A' = (BᵀB + δI)⁻¹ g_A, g_B' = g_B (AAᵀ + δI)⁻¹."""
import pytest
import torch
import torch.nn.functional as F

import lorazoo
from tiny import adapted, layer_input, perturb, single_layer, train

D = torch.float64


def _setup(optim="rplora", **kw):
    model, handle, layer = single_layer("lora", optim=optim, **kw)
    perturb(handle, scale=0.5)
    x = layer_input(n=9, features=20)
    target = layer_input(n=9, features=24, seed=4)
    return handle, layer, x, target


def _dense_grad(layer, x, target):
    """g = ∂L/∂W̃ with W̃ = W0 + s·B·A formed densely (independent of the form's forward)."""
    form = layer.adapters["default"].form
    W = (layer.base.weight.detach() + form.scale * form.B.detach() @ form.A.detach()).requires_grad_(True)
    F.mse_loss(x @ W.T + layer.base.bias.detach(), target).backward()
    return W.grad


@pytest.mark.parametrize("damping", [1e-6, 0.3])
def test_gradients_are_preconditioned_as_eq65(damping):
    handle, layer, x, target = _setup(rplora_damping=damping)
    form = layer.adapters["default"].form
    B, A, s = form.B.detach(), form.A.detach(), form.scale
    g = _dense_grad(layer, x, target)
    I = torch.eye(form.rank, dtype=D)
    ref_A = torch.linalg.inv(B.T @ B + damping * I) @ (s * B.T @ g)   # study's ∇A (BBᵀ)⁻¹, transposed
    ref_B = (s * g @ A.T) @ torch.linalg.inv(A @ A.T + damping * I)   # study's (AᵀA)⁻¹ ∇B, transposed
    F.mse_loss(layer(x), target).backward()
    handle.before_step(None)
    torch.testing.assert_close(form.A.grad, ref_A, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(form.B.grad, ref_B, rtol=1e-9, atol=1e-12)


def _first_order_step(optim, R):
    """s·(B g_A' + g_B' A) for the factorization (B R, R⁻¹ A) of the same product."""
    handle, layer, x, target = _setup(optim, rplora_damping=1e-12) if optim == "rplora" else _setup(optim)
    form = layer.adapters["default"].form
    with torch.no_grad():
        form.B.copy_(form.B @ R)
        form.A.copy_(torch.linalg.solve(R, form.A))
    F.mse_loss(layer(x), target).backward()
    handle.before_step(None)
    g = _dense_grad(layer, x, target)
    return form.scale * (form.B.detach() @ form.A.grad + form.B.grad @ form.A.detach()), g, form


def test_step_is_a_projection_invariant_to_the_factorization():
    """The Riemannian metric's point (Eq. 66-67): the weight moves by s²(Π_B g + g Π_A), whatever the split."""
    R = torch.tensor([[3.0, 0.5, 0.0], [0.0, 0.2, 0.1], [1.0, 0.0, 1.5]], dtype=D)
    step1, g, form = _first_order_step("rplora", torch.eye(3, dtype=D))
    step2, _, _ = _first_order_step("rplora", R)
    torch.testing.assert_close(step1, step2, rtol=1e-7, atol=1e-10)
    B, A, s = form.B.detach(), form.A.detach(), form.scale
    P_B = B @ torch.linalg.pinv(B)
    P_A = torch.linalg.pinv(A) @ A
    torch.testing.assert_close(step2, s * s * (P_B @ g + g @ P_A), rtol=1e-7, atol=1e-10)
    plain1, _, _ = _first_order_step("default", torch.eye(3, dtype=D))
    plain2, _, _ = _first_order_step("default", R)
    assert (plain1 - plain2).abs().max() > 0.1 * plain1.abs().max()  # plain LoRA's step is not invariant


def test_zero_B_at_init_is_handled_by_the_damping():
    model, handle, layer = single_layer("lora", optim="rplora")
    form = layer.adapters["default"].form
    x, target = layer_input(n=9, features=20), layer_input(n=9, features=24, seed=4)
    F.mse_loss(layer(x), target).backward()
    g_B = form.B.grad.clone()
    handle.before_step(None)
    assert (form.A.grad == 0).all()
    A = form.A.detach()
    ref = g_B @ torch.linalg.inv(A @ A.T + 1e-6 * torch.eye(3, dtype=D))
    torch.testing.assert_close(form.B.grad, ref, rtol=1e-9, atol=1e-12)


def test_trains_with_lora_and_dora():
    for form in ("lora", "dora"):
        model, handle = adapted(form=form, optim="rplora")
        losses = train(model, handle, steps=30, lr=1e-2)
        assert losses[-1] < 0.8 * losses[0], (form, losses)


@pytest.mark.parametrize("bad", [{"rplora_damping": 0}, {"rplora_damping": -1e-3}, {"rplora_damping": "x"}])
def test_bad_options_refused(bad):
    with pytest.raises(lorazoo.SpecError, match="rplora_damping"):
        lorazoo.AdapterSpec(optim="rplora", **bad)


def test_forms_without_factors_refused():
    for form in ("vera", "lorma_plus"):
        with pytest.raises(lorazoo.SpecError, match="rplora"):
            lorazoo.AdapterSpec(form=form, optim="rplora")
