"""SORSA ([81]; study Eq. 96-98): principal SVD triplets as P·diag(λ)·Q, residual base, orthonormal
regularizer stepped with γ/η."""
import pytest
import torch
import torch.nn.functional as F

import lorazoo
from lorazoo.schedules.sorsa import orthonormality
from tiny import TinyNet, layer_input, perturb, single_layer, tiny_data, train

D = torch.float64


def _sorsa(**kw):
    return single_layer("adalora", rank=3, **{**dict(init="sorsa", schedule="sorsa", scale="constant", alpha=1), **kw})


@pytest.mark.parametrize("scale, alpha", [("constant", 1), ("rslora", 16)])
def test_init_splits_w0_into_principal_adapter_and_residual(scale, alpha):
    torch.manual_seed(0)
    W0 = torch.nn.Linear(20, 24).double().weight.detach().clone()
    model, handle, layer = _sorsa(scale=scale, alpha=alpha)
    form = layer.adapters["default"].form
    U, S, Vh = torch.linalg.svd(W0)  # reference, straight from Eq. 96
    r = 3
    Wp = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(form.delta_weight(W0), Wp, rtol=1e-10, atol=1e-12)       # adapter = W_p
    torch.testing.assert_close(layer.base.weight.detach(), W0 - Wp, rtol=1e-10, atol=1e-12)  # base = W_res
    eye = torch.eye(r, dtype=D)
    torch.testing.assert_close(form.P.T @ form.P, eye, rtol=0, atol=1e-12)  # orthonormal singular vectors
    torch.testing.assert_close(form.Q @ form.Q.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(form.lam * form.scale, S[:r], rtol=1e-12, atol=1e-12)
    x = layer_input(features=20)
    ref = x @ W0.T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-12)  # starts as the base
    # Eq. 97 forward, written densely: W_res + s·P diag(λ) Q
    perturb(handle, scale=0.1)
    W = layer.base.weight.detach() + form.scale * form.P.detach() @ torch.diag(form.lam.detach()) @ form.Q.detach()
    torch.testing.assert_close(layer(x), x @ W.T + layer.base.bias.detach(), rtol=1e-10, atol=1e-12)


def test_regularizer_gradient_is_added_with_gamma_over_lr():
    gamma, lr = 4e-3, 0.05
    model, handle, layer = _sorsa(sorsa_gamma=gamma)
    perturb(handle, scale=0.2)
    form = layer.adapters["default"].form
    x, target = layer_input(features=20), layer_input(features=24, seed=5)
    F.mse_loss(layer(x), target).backward()
    task = {n: p.grad.clone() for n, p in (("P", form.P), ("Q", form.Q), ("lam", form.lam))}
    P, Q = form.P.detach().clone().requires_grad_(True), form.Q.detach().clone().requires_grad_(True)
    eye = torch.eye(3, dtype=D)
    reg = (torch.sqrt(((P.T @ P - eye) ** 2).sum()) + torch.sqrt(((Q @ Q.T - eye) ** 2).sum())) / 2  # authors' mean
    reg.backward()
    opt = torch.optim.SGD(handle.param_groups(lr))
    handle.before_step(opt)
    torch.testing.assert_close(form.P.grad, task["P"] + gamma / lr * P.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(form.Q.grad, task["Q"] + gamma / lr * Q.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(form.lam.grad, task["lam"], rtol=0, atol=0)  # λ is not regularized
    torch.testing.assert_close(orthonormality(handle), reg.detach(), rtol=1e-12, atol=1e-14)


def test_regularizer_keeps_the_singular_vectors_orthonormal():
    dev = {}
    for gamma in (0.0, 2e-3):
        model = TinyNet()
        handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("sorsa", rank=4, targets=["fc1", "fc2"],
                                                                 sorsa_gamma=gamma))
        losses = train(model, handle, steps=40, lr=2e-2)
        assert losses[-1] < losses[0]
        dev[gamma] = orthonormality(handle).item()
    assert dev[2e-3] < 0.5 * dev[0.0], dev


def test_saved_adapter_reproduces_the_residual_base(tmp_path):
    x, _ = tiny_data()
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("sorsa", rank=4, targets=["fc1", "fc2"]))
    train(model, handle, steps=5, lr=1e-2)
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-10, atol=1e-12)
    loaded.delete()
    torch.testing.assert_close(fresh(x=x).logits, TinyNet()(x=x).logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [dict(init="sorsa"), dict(schedule="sorsa"), dict(form="dora", init="sorsa"),
                                 dict(form="adalora", schedule="sorsa", sorsa_gamma=-1.0)])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError, match="sorsa"):
        lorazoo.AdapterSpec(**bad)
