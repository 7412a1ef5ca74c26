"""DeLoRA (Bini et al. [68]; study Eq. 69-70): ΔW = (λ/r)·Σ_i b_i a_iᵀ/(‖b_i‖‖a_i‖)·Σ_W minus the same
term of the frozen initial factors (the authors' zero start), Σ_W the column norms of W0."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, rank_mask_draw, single_layer, train


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def _term(B, A, lam, W0, mask=None):
    """Eq. 69 in float64, one normalized rank-one term at a time, times the column norms of W0."""
    r = A.shape[0]
    m = torch.ones(r, dtype=torch.float64) if mask is None else mask
    col = torch.sqrt((W0 * W0).sum(dim=0))  # ‖w_j‖ over the output dim, one per input column
    out = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
    for i in range(r):
        b, a = B[:, i], A[i]
        out += m[i] * torch.outer(b, a) / (torch.sqrt(b @ b) * torch.sqrt(a @ a))
    return (lam / r) * out * col[None, :]


def _dense(f, W0, mask=None):
    lam = f.lam.detach().item()
    return (_term(f.B.detach(), f.A.detach(), lam, W0, mask)
            - _term(f.B0.detach(), f.A0.detach(), lam, W0, mask))


def test_matches_dense_reference():
    model, handle = adapted("delora", rank=3, delora_lambda=2.5)
    perturb(handle)
    for name, fin in (("fc1", 12), ("fc2", 16)):
        layer, f = getattr(model, name), _form(model, name)
        W0, b = layer.base.weight.detach(), layer.base.bias.detach()
        assert f.lam.item() != 2.5  # perturbed
        dW = _dense(f, W0)
        x = layer_input(features=fin)
        torch.testing.assert_close(layer(x), x @ (W0 + dW).T + b, rtol=1e-6, atol=0)
        torch.testing.assert_close(f.delta_weight(W0), dW, rtol=1e-10, atol=1e-12)


def test_norm_bound_of_eq_70_on_random_factors():
    """‖(λ/r)·BΞA·Σ_W‖ <= λ‖W0‖ in the spectral and the Frobenius norm, for any B, A; the whole update
    (minus the frozen initial term) within 2λ‖W0‖."""
    model, handle, layer = single_layer("delora", rank=4, delora_lambda=3.0)
    f, W0 = layer.adapters["default"].form, layer.linear_weight().detach()
    gen = torch.Generator().manual_seed(5)
    spec2, fro = torch.linalg.matrix_norm(W0, 2), torch.linalg.matrix_norm(W0)
    for trial in range(20):
        with torch.no_grad():
            f.A.copy_(torch.randn(f.A.shape, generator=gen, dtype=torch.float64) * 10 ** (trial % 5 - 2))
            f.B.copy_(torch.randn(f.B.shape, generator=gen, dtype=torch.float64))
            if trial % 4 == 0:  # all rank-one terms aligned: the triangle inequality is tight
                f.A.copy_(f.A[:1].expand_as(f.A))
                f.B.copy_(f.B[:, :1].expand_as(f.B))
        T = _term(f.B.detach(), f.A.detach(), 3.0, W0)
        assert torch.linalg.matrix_norm(T, 2) <= 3.0 * spec2 * (1 + 1e-12)
        assert torch.linalg.matrix_norm(T) <= 3.0 * fro * (1 + 1e-12)
        dW = f.delta_weight(W0).detach()
        assert torch.linalg.matrix_norm(dW, 2) <= 2 * 3.0 * spec2 * (1 + 1e-12)
    # aligned terms (b_i = b, a_i = a) sum to λ·b aᵀΣ_W/(‖b‖‖a‖): spectral norm λ·‖Σ_W a‖/‖a‖,
    # not λ/r of it
    with torch.no_grad():
        f.A.copy_(f.A[:1].expand_as(f.A))
        f.B.copy_(f.B[:, :1].expand_as(f.B))
    T = _term(f.B.detach(), f.A.detach(), 3.0, W0)
    a = f.A.detach()[0] / f.A.detach()[0].norm()
    col = W0.norm(dim=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(T, 2), 3.0 * (a * col).norm(), rtol=1e-10, atol=0)


def test_strength_and_direction_are_decoupled():
    """Rescaling b_i or a_i by a positive factor leaves ΔW unchanged; λ scales it linearly."""
    model, handle, layer = single_layer("delora", rank=3)
    perturb(handle)
    f, W0 = layer.adapters["default"].form, layer.linear_weight()
    dW = f.delta_weight(W0).detach().clone()
    with torch.no_grad():
        f.B.mul_(torch.tensor([0.1, 7.0, 3.0], dtype=torch.float64))
        f.A.mul_(torch.tensor([[5.0], [0.2], [1.0]], dtype=torch.float64))
    torch.testing.assert_close(f.delta_weight(W0).detach(), dW, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        f.lam.mul_(2.0)
    torch.testing.assert_close(f.delta_weight(W0).detach(), 2 * dW, rtol=1e-10, atol=1e-13)


def test_zero_start_with_kaiming_factors_and_a_frozen_copy():
    model, handle = adapted("delora", rank=4)
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-12, atol=1e-14)
    for name in ("fc1", "fc2"):
        f = _form(model, name)
        assert torch.count_nonzero(f.A) == f.A.numel() and torch.count_nonzero(f.B) == f.B.numel()
        assert torch.equal(f.A0, f.A) and torch.equal(f.B0, f.B) and f.lam.item() == 8.0
        assert not f.A0.requires_grad and not f.B0.requires_grad
        W0 = getattr(TinyNet(), name).weight.detach()
        torch.testing.assert_close(f.w_norm, torch.sqrt((W0 * W0).sum(0)), rtol=1e-12, atol=0)
        assert torch.count_nonzero(f.delta_weight(getattr(model, name).linear_weight())) == 0
    assert handle.num_trainable() == 4 * (12 + 16) + 1 + 4 * (16 + 16) + 1  # B, A and λ per layer
    model(x).logits.sum().backward()
    f = _form(model)
    assert torch.count_nonzero(f.B.grad) > 0 and torch.count_nonzero(f.A.grad) > 0
    assert f.lam.grad.abs().item() < 1e-12  # as the authors' code: λ scales a zero difference at first
    for k in ("A0", "B0", "w_norm"):
        assert any(key.endswith(f"form.{k}") for key in handle.state_dict())  # saved with the adapter


def test_rank_at_most_2r():
    model, handle = adapted("delora", rank=2)
    perturb(handle)
    assert torch.linalg.matrix_rank(_form(model).delta_weight(model.fc2.linear_weight())) == 4


def test_rank_mask_on_both_terms():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="delora", rank=6, rank_dropout=0.5, targets=["fc2"]))
    perturb(handle)
    f, W0, b = _form(model), model.fc2.base.weight.detach(), model.fc2.base.bias.detach()
    x = layer_input()
    seed, keep = rank_mask_draw(6, 0.5)
    torch.manual_seed(seed)
    out = model.fc2(x)
    torch.testing.assert_close(out, x @ (W0 + _dense(f, W0, keep)).T + b, rtol=1e-6, atol=0)
    handle2 = adapted("delora", rank=4, rank_dropout=0.5)  # zero start holds under any mask
    handle2[0].train()
    x12 = layer_input(features=12)
    torch.testing.assert_close(handle2[0](x12).logits, TinyNet()(x12).logits, rtol=1e-12, atol=1e-14)


def test_forward_never_forms_the_update():
    model, handle, layer = single_layer("delora", rank=3)
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None)
                       .sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes
    assert f.lam.grad is not None and f.A.grad is not None and f.B.grad is not None
    assert (24, 20) in op_shapes(lambda: f.delta_weight(layer.linear_weight()))


def test_bad_options_and_scale_refused():
    for bad in (0, -1.0, "8"):
        with pytest.raises(lorazoo.SpecError, match="delora_lambda"):
            lorazoo.AdapterSpec(form="delora", delora_lambda=bad)
    for scale in ("rslora", "constant"):
        with pytest.raises(lorazoo.SpecError, match=rf"(?s)'delora'.*scale='{scale}'"):
            lorazoo.AdapterSpec(form="delora", scale=scale)


@pytest.mark.parametrize("kw, part", [(dict(init="pissa"), "pissa"), (dict(init="lora_ga"), "lora_ga"),
                                       (dict(optim="lora_pro"), "lora_pro"), (dict(schedule="relora"), "relora")])
def test_meaningless_combinations_refused_at_spec(kw, part):
    with pytest.raises(lorazoo.SpecError, match=rf"(?s)'{part}'.*'delora'"):
        lorazoo.AdapterSpec(form="delora", **kw)


@pytest.mark.parametrize("kw", [dict(optim="loraplus"), dict(rank_dropout=0.3), dict(dropout=0.1)])
def test_meaningful_combinations_train(kw):
    model, handle = adapted("delora", rank=4, **kw)
    losses = train(model, handle, steps=10, lr=2e-2)
    assert losses[-1] < losses[0]


def test_loraplus_puts_b_and_lambda_in_the_fast_group():
    model, handle = adapted("delora", rank=4, optim="loraplus")
    groups = {g["name"]: g for g in handle.param_groups(1e-3)}
    fast = {id(p) for p in groups["B"]["params"]}
    for n in ("fc1", "fc2"):
        f = _form(model, n)
        assert id(f.B) in fast and id(f.lam) in fast and id(f.A) not in fast
