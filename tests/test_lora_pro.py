"""LoRA-Pro ([25]; study Eq. 77-84): LoRA's equivalent gradient s·(B g_A' + g_B' A) is the
least-squares projection of the full fine-tuning gradient onto the tangent space {B dA + dB A}, with
X from the Sylvester equation (Eq. 84). References solve the least-squares problems directly.
Exactness tests use a damping of 1e-12 (float64), so that the damping's own O(δ/λ_min) bias stays
far below rtol 1e-6; the default damping (1e-8) is checked at a tolerance matching that bias."""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

import lorazoo
from lorazoo.optim.lora_pro import LoRAPro, lora_pro_gradients
from lorazoo.parts import Form
from tiny import TinyNet, adapted, perturb, tiny_data, train

D = torch.float64
EXACT = 1e-12  # damping for exactness tests


def _random(m=7, n=5, r=3, s=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, A, G = (torch.randn(*shape, generator=g, dtype=D) for shape in ((m, r), (r, n), (m, n)))
    return B, A, G, s * G @ A.T, s * B.T @ G  # B, A, g, g_B = s g Aᵀ, g_A = s Bᵀ g


def _tangent_projection(B, A, s, G):
    """argmin over the reachable set {s(B dA + dB A)} of ‖· − g‖, by least squares on vectors."""
    m, r = B.shape
    n = A.shape[1]
    def equiv(v):
        dA, dB = v[:r * n].reshape(r, n), v[r * n:].reshape(m, r)
        return (s * (B @ dA + dB @ A)).flatten()
    L = jacobian(equiv, torch.zeros(r * n + m * r, dtype=D))
    sol = torch.linalg.lstsq(L, G.flatten(), driver="gelsd").solution
    return (L @ sol).reshape(m, n)


def test_equivalent_gradient_is_the_least_squares_projection():
    B, A, G, gB, gA = _random()
    s = 0.7
    new_B, new_A, _ = lora_pro_gradients(B, A, gB, gA, s, EXACT)
    equiv = s * (B @ new_A + new_B @ A)
    ref = _tangent_projection(B, A, s, G)
    torch.testing.assert_close(equiv, ref, rtol=1e-6, atol=1e-9)
    # least-squares optimality: the residual is orthogonal to the tangent space
    res = G - equiv
    torch.testing.assert_close(B.T @ res, torch.zeros_like(A), rtol=0, atol=1e-9)
    torch.testing.assert_close(res @ A.T, torch.zeros_like(B), rtol=0, atol=1e-9)
    # and strictly better than plain LoRA's equivalent gradient
    assert (G - equiv).norm() < (G - s * (B @ gA + gB @ A)).norm()


def test_X_solves_the_sylvester_equation_and_minimizes_eq83():
    B, A, G, gB, gA = _random(m=9, n=6, r=4, seed=1)
    s = 1.3
    new_B, new_A, X = lora_pro_gradients(B, A, gB, gA, s, EXACT)
    inv = torch.linalg.inv
    BtB, AAt = B.T @ B, A @ A.T
    # Eq. 84: BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ
    torch.testing.assert_close(BtB @ X + X @ AAt, -inv(BtB) @ gA @ A.T / s ** 2, rtol=1e-6, atol=1e-10)
    # Eq. 81-82 with M = 0, then X minimizing ‖g_A' − g_A‖² + ‖g_B' − g_B‖² (Eq. 83) by least squares
    P = inv(BtB) @ gA / s ** 2
    Q = (torch.eye(9, dtype=D) - B @ inv(BtB) @ B.T) @ gB @ inv(AAt) / s ** 2
    lin = lambda v: torch.cat([(v.reshape(4, 4) @ A).flatten(), (-B @ v.reshape(4, 4)).flatten()])
    L = jacobian(lin, torch.zeros(16, dtype=D))
    X_ref = torch.linalg.lstsq(L, torch.cat([(gA - P).flatten(), (gB - Q).flatten()])).solution.reshape(4, 4)
    torch.testing.assert_close(X, X_ref, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(new_A, P + X_ref @ A, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(new_B, Q - B @ X_ref, rtol=1e-6, atol=1e-10)


def _full_ft_gradients(model, x, y):
    """∂L/∂W of each adapted layer's effective weight W0 + s·B·A, by full fine-tuning a merged copy."""
    full = TinyNet()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            layer, form = getattr(model, name), getattr(model, name).adapters["default"].form
            getattr(full, name).weight.copy_(layer.base.weight + form.delta_weight(layer.base.weight))
    full(x=x, labels=y).loss.backward()
    return {name: getattr(full, name).weight.grad for name in ("fc1", "fc2")}


def test_through_the_handle_aligns_with_full_fine_tuning():
    x, y = tiny_data()
    model, handle = adapted(optim="lora_pro", lora_pro_damping=EXACT)
    perturb(handle)
    full = _full_ft_gradients(model, x, y)
    model(x=x, labels=y).loss.backward()
    for name, G in full.items():
        form = getattr(model, name).adapters["default"].form
        s = form.scale
        # the premise: LoRA's gradients are the projections s·Bᵀg and s·g·Aᵀ of the full gradient
        torch.testing.assert_close(form.A.grad, s * form.B.detach().T @ G, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(form.B.grad, s * G @ form.A.detach().T, rtol=1e-6, atol=1e-12)
    handle.before_step(None)
    for name, G in full.items():
        form = getattr(model, name).adapters["default"].form
        B, A, s = form.B.detach(), form.A.detach(), form.scale
        equiv = s * (B @ form.A.grad + form.B.grad @ A)
        torch.testing.assert_close(equiv, _tangent_projection(B, A, s, G), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("damping, rtol", [(EXACT, 1e-6), (1e-8, 1e-4)])
def test_zero_B_at_init_is_handled(damping, rtol):
    x, y = tiny_data()
    model, handle = adapted(optim="lora_pro", lora_pro_damping=damping)
    full = _full_ft_gradients(model, x, y)
    model(x=x, labels=y).loss.backward()
    handle.before_step(None)
    for name, G in full.items():
        form = getattr(model, name).adapters["default"].form
        A, s = form.A.detach(), form.scale
        assert torch.isfinite(form.B.grad).all() and torch.isfinite(form.A.grad).all()
        assert (form.A.grad == 0).all()
        # B = 0: the tangent space is {dB·A}, the projection is g·Aᵀ(AAᵀ)⁻¹A
        torch.testing.assert_close(s * form.B.grad @ A, G @ A.T @ torch.linalg.inv(A @ A.T) @ A,
                                   rtol=rtol, atol=1e-10)


def test_training_steps_follow_the_projected_gradient():
    # a few AdamW steps stay finite and lower the loss (B grows from zero through the damped inverse)
    model, handle = adapted(optim="lora_pro")
    losses = train(model, handle, steps=15, lr=1e-2)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0]


class _NoFactors(Form):
    pass


class _Multiplicative(Form):
    multiplicative = True

    def factors(self):
        return None


def test_forms_without_additive_factors_are_refused():
    for cls in (_NoFactors, _Multiplicative):
        with pytest.raises(lorazoo.SpecError, match="lora_pro"):
            LoRAPro.check_form(cls)


@pytest.mark.parametrize("bad", [0, -1e-8, float("nan")])
def test_damping_must_be_positive(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(optim="lora_pro", lora_pro_damping=bad)
