"""Aurora (AuroRA [72]; study Eq. 86-87, 136-137): h = W0 x + s·B·ANL(A x),
ANL(z) = tanh(C tanh z) + V·Σ_j b(z_j), b the B-spline basis on a uniform grid (authors' code)."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

import lorazoo
from lorazoo.forms.aurora import _ANL, bspline_basis
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, rank_mask_draw, single_layer, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def _knots(grid_size=5, order=3, bound=1.0):
    """t_i = -bound + (i - p)·2·bound/G, i = 0..G+2p: G intervals over [-bound, bound], p more each side."""
    return -bound + (np.arange(grid_size + 2 * order + 1) - order) * (2 * bound / grid_size)


def _basis(z, knots, order):
    """scipy's B-spline basis elements at every entry of z: (*z.shape, len(knots) - order - 1), 0 off support."""
    n = len(knots) - order - 1
    out = np.zeros(z.shape + (n,))
    for i in range(n):
        element = BSpline.basis_element(knots[i:i + order + 2], extrapolate=False)
        out[..., i] = np.nan_to_num(element(z.ravel())).reshape(z.shape)
    return out


def _reference(layer, x, scale, mask=None, grid_size=5, order=3, bound=1.0, base=True):
    """Eq. 86-87 token by token in numpy: W0 x + b + s·B·(m ⊙ (tanh(C tanh z) + V Σ_j b(z_j))), z = A x."""
    f = _form(layer)
    A, B, C, V = (t.detach().numpy() for t in (f.A, f.B, f.C, f.V))
    W0, b = layer.base.weight.detach().numpy(), layer.base.bias.detach().numpy()
    knots = _knots(grid_size, order, bound)
    xs = x.numpy().reshape(-1, x.shape[-1])
    m = np.ones(A.shape[0]) if mask is None else mask.numpy()
    rows = []
    for token in xs:
        z = A @ token
        anl = np.tanh(C @ np.tanh(z)) + V @ _basis(z, knots, order).sum(0)
        rows.append((W0 @ token + b if base else 0) + scale * B @ (m * anl))
    return torch.from_numpy(np.stack(rows).reshape(*x.shape[:-1], -1))


def test_matches_dense_reference_per_token():
    model, handle = adapted("aurora", rank=3, alpha=6)
    perturb(handle)
    x = layer_input(n=8).reshape(2, 4, 16)  # (batch, seq, in): the ANL acts per token
    z = _form(model.fc2).A.detach() @ x.reshape(-1, 16).T
    assert z.min() < -2.2 and z.max() > 2.2 and ((z > -1) & (z < 1)).any()  # inside and outside the grid
    torch.testing.assert_close(model.fc2(x), _reference(model.fc2, x, 6 / 3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid_size,order,bound", [(5, 3, 1.0), (4, 2, 0.5), (7, 1, 2.0), (3, 0, 1.0)])
def test_options_change_the_grid_as_the_equations_say(grid_size, order, bound):
    opts = dict(aurora_grid_size=grid_size, aurora_spline_order=order, aurora_grid_bound=bound)
    model, handle = adapted("aurora", rank=2, alpha=2, **opts)
    perturb(handle, scale=0.5)
    assert _form(model.fc1).V.shape == (2, grid_size + order)
    x = layer_input(n=6)
    torch.testing.assert_close(model.fc2(x), _reference(model.fc2, x, 1.0, grid_size=grid_size, order=order,
                                                        bound=bound), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_cox_de_boor_basis_matches_scipy(order):
    grid_size, bound = 6, 1.5
    knots = _knots(grid_size, order, bound)
    h = knots[1] - knots[0]
    z = np.random.default_rng(order).uniform(-4, 4, 300)  # off the knots (conventions differ on them)
    u = torch.from_numpy((z - knots[0]) / h)  # the grid coordinate: knots at 0, 1, ..., G + 2p
    ours = bspline_basis(u, grid_size + 2 * order, order).numpy()
    np.testing.assert_allclose(ours, _basis(z, knots, order), rtol=1e-12, atol=1e-14)
    inside = np.abs(z) <= bound  # partition of unity on [-bound, bound]
    np.testing.assert_allclose(ours[inside].sum(-1), 1.0, rtol=1e-12)
    assert np.all(ours[np.abs(z) >= knots[-1]] == 0)  # past the extended grid: zero


@pytest.mark.parametrize("order", [0, 1, 3])
def test_anl_gradient(order):
    """The fused ANL's hand-written backward (recomputing tanh and the basis) against finite differences."""
    g = torch.Generator().manual_seed(order)
    z = (torch.rand(4, 3, 5, generator=g, dtype=torch.float64) * 6 - 3).requires_grad_()  # grid [-2.2, 2.2]
    C = torch.randn(5, 5, generator=g, dtype=torch.float64).requires_grad_()
    V = torch.randn(5, 5 + order, generator=g, dtype=torch.float64).requires_grad_()
    slope, offset = 5 / 2, 2.5 + order  # G = 5 intervals on [-1, 1]
    assert torch.autograd.gradcheck(lambda *t: _ANL.apply(*t, slope, offset, 5 + 2 * order, order), (z, C, V))


def test_layer_gradients_match_finite_differences():
    model, handle, layer = single_layer("aurora", in_features=6, out_features=5, rank=3)
    perturb(handle, scale=1.0)
    f = _form(layer)
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(4, 5, dtype=torch.float64)

    def loss():
        return f(x, y, None, None).square().sum()

    loss().backward()
    for p in (f.A, f.B, f.C, f.V):
        numeric = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                p.view(-1)[i] += 1e-6
                plus = loss()
                p.view(-1)[i] -= 2e-6
                minus = loss()
                p.view(-1)[i] += 1e-6
                numeric.view(-1)[i] = (plus - minus) / 2e-6
        torch.testing.assert_close(p.grad, numeric, rtol=1e-5, atol=1e-7)


def test_defaults_init_and_parameter_count():
    model, handle = adapted("aurora", rank=4)
    f = _form(model.fc2)
    assert (f.grid_size, f.order, f.bound, f.spline_init) == (5, 3, 1.0, 0.1)
    assert f.C.shape == (4, 4) and f.V.shape == (4, 8)
    assert torch.count_nonzero(f.B) == 0 and f.A.abs().min() > 0
    assert f.A.abs().max() <= 1 / math.sqrt(16)  # Kaiming-uniform with a = sqrt(5), as LoRA
    assert 0 < f.V.abs().max() <= 0.1  # uniform(-0.1, 0.1), the authors' scale_noise
    assert f.C.abs().min() > 0  # xavier-normal
    assert handle.num_trainable() == sum(4 * i + o * 4 + 16 + 32 for i, o in ((12, 16), (16, 16)))
    assert not any("knots" in k for k in model.state_dict())  # derived from the options, not saved


def test_starts_as_base_although_the_anl_is_not_zero():
    x, _ = tiny_data()
    model, handle = adapted("aurora", rank=4)
    f = _form(model.fc1)
    assert f.phi(torch.zeros(3, 4, dtype=torch.float64)).abs().min() > 0  # spline of 0 is not 0
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("init", [True, False])
def test_gradient_reaches_every_trainable_tensor(init):
    model, handle = adapted("aurora", rank=3)
    if not init:
        perturb(handle)
    x, y = tiny_data()
    model(x=x, labels=y).loss.backward()
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        assert f.B.grad.abs().sum() > 0
        for t in (f.A, f.C, f.V):  # at init B = 0 stops them, as it stops LoRA's A
            assert (t.grad.abs().sum() > 0) == (not init)


def test_rank_dropout_masks_the_anl_output():
    model, handle = adapted("aurora", rank=2, alpha=2)
    perturb(handle)
    layer, x = model.fc2, layer_input()
    f = _form(layer)
    mask = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = f(x, torch.zeros(5, 16, dtype=torch.float64), None, mask)
    torch.testing.assert_close(out, _reference(layer, x, 1.0, mask=mask, base=False), rtol=1e-10, atol=1e-12)
    # unbiased: the mean over the four equally likely masks of p = 0.5 is the unmasked update
    masks = [torch.tensor(m, dtype=torch.float64) for m in ([0, 0], [0, 2], [2, 0], [2, 2])]
    mean = sum(f(x, torch.zeros(5, 16, dtype=torch.float64), None, m) for m in masks) / 4
    torch.testing.assert_close(mean, f(x, torch.zeros(5, 16, dtype=torch.float64), None, None))


def test_rank_dropout_runs_in_training_only():
    model, handle = adapted("aurora", rank=4, rank_dropout=0.5)
    perturb(handle)
    x, _ = tiny_data()
    model.eval()
    ev = model(x).logits
    model.train()
    seed, _ = rank_mask_draw(4, 0.5)  # fc1 draws a mask that keeps some but not all of the rank
    torch.manual_seed(seed)
    assert not torch.allclose(model(x).logits, ev)
    model.eval()
    torch.testing.assert_close(model(x).logits, ev, rtol=0, atol=0)


def test_not_mergeable():
    model, handle = adapted("aurora", rank=2)
    perturb(handle)
    with pytest.raises(lorazoo.NotMergeableError, match="depends on the input"):
        handle.merge()
    with pytest.raises(lorazoo.NotMergeableError, match="input"):
        _form(model.fc1).delta_weight(model.fc1.linear_weight())
    assert not handle.merged


def _saved_shapes(form, x, y):
    """Shapes of what autograd keeps for backward in one forward of ``form``."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        form(x, y, None, None)
    return Counter(saved)


def test_forward_never_forms_the_dense_update_and_keeps_one_tensor_more_than_lora():
    model, handle, layer = single_layer("aurora", in_features=20, out_features=24, rank=3)
    perturb(handle)
    f = _form(layer)
    x = layer_input(n=7, features=20).requires_grad_()
    y = torch.zeros(7, 24, dtype=torch.float64)
    shapes = op_shapes(lambda: f(x, y, layer.linear_weight(), None).sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes
    assert all(t.grad is not None for t in (f.A, f.B, f.C, f.V, x))
    lora = _form(single_layer("lora", in_features=20, out_features=24, rank=3)[2])
    # z = A x (tokens x r) and the small C, V: no tanh outputs, no (tokens x r x basis) values
    assert _saved_shapes(f, x, y) - _saved_shapes(lora, x, y) == Counter({(7, 3): 1, (3, 3): 1, (3, 8): 1})


def test_low_precision_spline_runs_in_float32():
    model, handle, layer = single_layer("aurora", rank=3)
    perturb(handle, scale=1.0)
    f = _form(layer)
    z = torch.linspace(-2.5, 2.5, 12, dtype=torch.float64).reshape(4, 3)
    torch.testing.assert_close(f.spline(z.to(torch.bfloat16)).double(), f.spline(z), rtol=2e-2, atol=2e-2)
    model.to(torch.bfloat16)
    x = torch.randn(6, 20, dtype=torch.bfloat16)
    model(x).float().square().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in (f.A, f.B, f.C, f.V))


def test_rslora_scale_and_loraplus_groups():
    model, handle = adapted("aurora", rank=4, alpha=8, scale="rslora", optim="loraplus")
    f = _form(model.fc1)
    assert f.scale == pytest.approx(8 / 2)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in handle.param_groups(1e-3)}
    assert id(f.B) in groups["B"]
    assert {id(f.A), id(f.C), id(f.V)} <= groups["A"]


@pytest.mark.parametrize("init", ["pissa", "milora", "lora_ga", "eva"])
def test_factor_inits_refused(init):
    with pytest.raises(lorazoo.SpecError, match=rf"init '{init}'.*form 'aurora'"):
        lorazoo.AdapterSpec(form="aurora", init=init)


@pytest.mark.parametrize("part", [dict(schedule="relora"), dict(optim="lora_pro")])
def test_parts_relying_on_plain_b_a_refused(part):
    with pytest.raises(lorazoo.SpecError, match="aurora"):
        lorazoo.AdapterSpec(form="aurora", **part)


@pytest.mark.parametrize("key,value", [
    ("aurora_grid_size", 0), ("aurora_grid_size", 2.5), ("aurora_spline_order", -1),
    ("aurora_spline_order", "3"), ("aurora_grid_bound", 0.0), ("aurora_spline_init", -0.1),
])
def test_bad_options_refused(key, value):
    with pytest.raises(lorazoo.SpecError, match=key):
        lorazoo.AdapterSpec(form="aurora", **{key: value})
