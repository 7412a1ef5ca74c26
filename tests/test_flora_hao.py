"""FLoRA (Hao et al. [70]; study Eq. 71-76): frozen random A ~ N(0, 1/r) compresses the gradient,
every κ steps W0 += s·B·A, A redrawn, B <- 0, m_B <- m_B·A_old·A_newᵀ."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from test_checkpoint import merges_survive_a_kill
from tiny import TinyNet, layer_input, tiny_data, train

NAMES = ("fc1", "fc2")
D = torch.float64


def _adapted(model=None, **kw):
    model = TinyNet() if model is None else model
    spec = lorazoo.AdapterSpec.preset("flora_hao", **{"rank": 4, "targets": ["fc1", "fc2"], **kw})
    return model, lorazoo.adapt(model, spec)


def _form(model, n):
    return getattr(model, n).adapters["default"].form


def _effective(model, n):
    """W0 (with the folds so far) + s·B·A of layer ``n``."""
    layer, f = getattr(model, n), _form(model, n)
    return (layer.base.weight + f.scale * f.B @ f.A).detach().clone()


def _dense_loss(weights, biases, head, x, y):
    """TinyNet's loss written out, with the adapted layers' weights as plain tensors."""
    h = torch.tanh(x @ weights["fc1"].T + biases["fc1"])
    h = torch.tanh(h @ weights["fc2"].T + biases["fc2"])
    return F.cross_entropy(h @ head.weight.T + head.bias, y)


def test_starts_with_a_gaussian_projection_and_zero_B():
    model, handle = _adapted()
    base = TinyNet()
    x, _ = tiny_data()
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=1e-15)
    big = nn.Sequential(nn.Linear(4096, 8))
    lorazoo.adapt(big, lorazoo.AdapterSpec.preset("flora_hao", rank=8, targets=["0"]))
    A = big[0].adapters["default"].form.A.detach().double()
    assert abs(A.mean().item()) < 0.01 and abs(A.var().item() * 8 - 1) < 0.03  # N(0, 1/r): E[AᵀA] = I
    f1, f2 = _form(model, "fc1"), _form(model, "fc2")
    assert (f1.B == 0).all() and (f2.B == 0).all() and not torch.equal(f1.A[:, :12], f2.A[:, :12])
    assert not f1.A.requires_grad and not f2.A.requires_grad
    assert {id(p) for g in handle.param_groups(1e-2) for p in g["params"]} == {id(f1.B), id(f2.B)}


@pytest.mark.parametrize("alpha", [1.0, 2.0])  # s = 1 (the paper), s = 2 (the step gets s²)
def test_sgd_trains_B_on_the_compressed_gradient(alpha):
    """Eq. 71-73 with A frozen (f_A ≡ 0): B_t = −η s Σ G_i Aᵀ, so ΔW_t = −η s² Σ G_i AᵀA (Eq. 76, exact)."""
    eta, steps = 0.1, 4
    model = nn.Sequential(nn.Linear(20, 24)).double()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("flora_hao", rank=3, alpha=alpha, targets=["0"]))
    layer, f = model[0], model[0].adapters["default"].form
    s, A = f.scale, f.A.detach().clone()
    assert s == alpha
    x, target = layer_input(n=7, features=20), layer_input(n=7, features=24, seed=2)
    W0, b = layer.base.weight.detach().clone(), layer.base.bias.detach()
    W, B_ref = W0.clone(), torch.zeros(24, 3, dtype=D)
    opt = torch.optim.SGD(handle.param_groups(eta))
    for step in range(1, steps + 1):
        Wl = W.clone().requires_grad_(True)
        G, = torch.autograd.grad(F.mse_loss(x @ Wl.T + b, target), Wl)  # the full-model gradient at W_t
        B_ref -= eta * s * G @ A.T           # compress
        W -= eta * s * s * G @ A.T @ A        # decompress
        F.mse_loss(layer(x), target).backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        torch.testing.assert_close(f.B.detach(), B_ref, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close((layer.base.weight + s * f.B @ f.A).detach(), W, rtol=1e-10, atol=1e-13)
    assert torch.equal(f.A, A) and torch.equal(layer.base.weight, W0)  # no resample before κ = 1000


def test_sgd_momentum_follows_floras_algorithm_with_resampling():
    """Exact for SGD with momentum: M_t = μM + G_t·Aᵀ, W -= η M_t·A; every κ steps M <- M·A_old·A_newᵀ."""
    eta, mu, kappa, steps = 0.05, 0.9, 3, 8
    x, y = tiny_data()
    model, handle = _adapted(flora_hao_interval=kappa)
    ref_model = TinyNet()
    W = {n: getattr(ref_model, n).weight.detach().clone() for n in NAMES}
    bias = {n: getattr(ref_model, n).bias.detach() for n in NAMES}
    A = {n: _form(model, n).A.detach().clone() for n in NAMES}  # the draws, read; the math is the reference's
    M = {n: torch.zeros(16, 4, dtype=D) for n in NAMES}
    opt = torch.optim.SGD(handle.param_groups(eta), momentum=mu)
    for step in range(1, steps + 1):
        leaves = {n: W[n].clone().requires_grad_(True) for n in NAMES}
        grads = torch.autograd.grad(_dense_loss(leaves, bias, ref_model.head, x, y), [leaves[n] for n in NAMES])
        for n, G in zip(NAMES, grads):
            M[n] = mu * M[n] + G @ A[n].T
            W[n] = W[n] - eta * M[n] @ A[n]
        model(x=x, labels=y).loss.backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        if step % kappa == 0:
            for n in NAMES:
                A_new = _form(model, n).A.detach().clone()
                assert not torch.allclose(A_new, A[n])
                M[n] = M[n] @ A[n] @ A_new.T
                A[n] = A_new
                assert (_form(model, n).B == 0).all()
        for n in NAMES:
            torch.testing.assert_close(_effective(model, n), W[n], rtol=1e-9, atol=1e-12)
    for n in NAMES:  # the transferred momentum is exactly SGD's buffer
        torch.testing.assert_close(opt.state[_form(model, n).B]["momentum_buffer"], M[n], rtol=1e-9, atol=1e-12)


def test_adam_moments_at_a_resample():
    """First moment: m·A_old·A_newᵀ (the paper); second: each row its mean (no faithful transfer);
    step count kept; W0 += s·B·A, B = 0: the model computes the same function."""
    x, y = tiny_data()
    model, handle = _adapted(flora_hao_interval=3)
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    for step in range(1, 4):
        model(x=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
        if step < 3:
            handle.after_step(opt, step)
    before = {}
    for n in NAMES:
        f = _form(model, n)
        st = opt.state[f.B]
        before[n] = (getattr(model, n).base.weight.detach().clone(), f.B.detach().clone(), f.A.detach().clone(),
                     st["exp_avg"].clone(), st["exp_avg_sq"].clone(), float(st["step"]))
    out = model(x=x).logits.detach()
    handle.after_step(opt, 3)
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-10, atol=1e-12)
    for n, (W, B, A_old, m, v, t) in before.items():
        f = _form(model, n)
        st, A_new = opt.state[f.B], f.A.detach()
        m_ref = torch.zeros_like(m)  # m_new[i, j] = Σ_k Σ_l m[i, k] A_old[k, l] A_new[j, l]
        for j in range(A_new.shape[0]):
            for k in range(A_old.shape[0]):
                m_ref[:, j] += m[:, k] * (A_old[k] * A_new[j]).sum()
        torch.testing.assert_close(st["exp_avg"], m_ref, rtol=1e-10, atol=1e-14)
        for i in range(v.shape[0]):
            torch.testing.assert_close(st["exp_avg_sq"][i], torch.full_like(v[i], v[i].sum().item() / v.shape[1]),
                                       rtol=1e-12, atol=0)
        assert float(st["step"]) == t
        torch.testing.assert_close(getattr(model, n).base.weight.detach(), W + f.scale * B @ A_old,
                                   rtol=1e-12, atol=1e-14)
        assert (f.B == 0).all() and not f.A.requires_grad and f.A not in opt.state
    # training goes on from there without a jump
    losses = [model(x=x, labels=y).loss.item()]
    for step in range(4, 10):
        model(x=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        losses.append(model(x=x, labels=y).loss.item())
    assert max(losses) <= losses[0] + 1e-9 and losses[-1] < losses[0]


def test_accumulated_update_exceeds_rank_r_and_saves(tmp_path):
    x, _ = tiny_data()
    base0 = TinyNet()
    model, handle = _adapted(flora_hao_interval=2)
    losses = train(model, handle, steps=12, lr=2e-2)  # 6 resamples of rank 4
    assert losses[-1] < 0.9 * losses[0]
    for n in NAMES:
        layer, ad = getattr(model, n), getattr(model, n).adapters["default"]
        change = layer.base.weight.detach() - getattr(base0, n).weight
        assert torch.linalg.matrix_rank(change, rtol=1e-8).item() > 4
        assert ad.shift_A.shape[0] <= min(layer.in_features, layer.out_features)
        torch.testing.assert_close(ad.shift_B @ ad.shift_A, change, rtol=1e-10, atol=1e-12)
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-10, atol=1e-12)
    for n in NAMES:  # the current projection came back, still frozen
        torch.testing.assert_close(_form(fresh, n).A, _form(model, n).A, rtol=0, atol=0)
        assert not _form(fresh, n).A.requires_grad
    loaded.delete()
    torch.testing.assert_close(fresh(x=x).logits, base0(x=x).logits, rtol=1e-10, atol=1e-12)


def test_draws_depend_on_seed_and_resample_only():
    """Every process (and a float32 run) redraws the same A; another seed draws another."""
    def after_resample(seed, dtype):
        model, handle = _adapted(TinyNet(dtype=dtype), seed=seed, flora_hao_interval=2)
        torch.manual_seed(seed + 17)  # the global RNG plays no part
        handle.after_step(None, 4)
        return {n: _form(model, n).A.detach().double() for n in NAMES}
    a, b = after_resample(0, D), after_resample(0, torch.float32)
    c = after_resample(1, D)
    for n in NAMES:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
        assert not torch.allclose(a[n], c[n])
    model, handle = _adapted(seed=0, flora_hao_interval=2)
    A0 = _form(model, "fc1").A.detach().clone()
    handle.after_step(None, 2)
    A1 = _form(model, "fc1").A.detach().clone()
    assert not torch.allclose(A0, A1) and not torch.allclose(A1, a["fc1"])  # resample 1 vs resample 2


def _make():
    model = TinyNet(dtype=torch.float32)
    return model, lorazoo.adapt(model, lorazoo.AdapterSpec.preset(
        "flora_hao", rank=4, targets=["fc1", "fc2"], flora_hao_interval=0.25))  # κ = 3 of 12 steps, via plan


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    handle, model2, handle2 = merges_survive_a_kill(tmp_path, _make, kill=10, every=4)
    assert handle.schedule.interval == 3
    assert handle2.schedule.interval == 3
    for n in NAMES:  # 4 resamples folded into the base; step 12 ended on one (B = 0)
        ad = getattr(model2, n).adapters["default"]
        assert ad.shift_A.shape[0] > 0 and (ad.form.B == 0).all() and not ad.form.A.requires_grad


def test_fraction_needs_a_plan_and_merged_training_is_refused():
    model, handle = _adapted(flora_hao_interval=0.25)
    with pytest.raises(lorazoo.LorazooError, match="plan"):
        handle.after_step(None, 1)
    model, handle = _adapted(flora_hao_interval=2)
    handle.merge()
    with pytest.raises(lorazoo.LorazooError, match="unmerge"):
        handle.after_step(None, 2)


def test_unknown_optimizer_state_is_refused_before_any_change():
    x, y = tiny_data()
    model, handle = _adapted(flora_hao_interval=2)
    opt = torch.optim.Adagrad(handle.param_groups(1e-2))
    model(x=x, labels=y).loss.backward()
    opt.step()
    before = {n: (getattr(model, n).base.weight.detach().clone(), _form(model, n).B.detach().clone()) for n in NAMES}
    with pytest.raises(lorazoo.LorazooError, match="sum"):
        handle.after_step(opt, 2)
    for n, (W, B) in before.items():
        assert torch.equal(getattr(model, n).base.weight, W) and torch.equal(_form(model, n).B, B)


@pytest.mark.parametrize("bad", [dict(flora_hao_interval=0), dict(flora_hao_interval=1.5),
                                 dict(flora_hao_interval=-3), dict(form="dora"), dict(form="vera"),
                                 dict(form="moslora"), dict(init="default"), dict(init="pissa"),
                                 dict(optim="lora_pro"), dict(optim="rplora"), dict(optim="loraplus"),
                                 dict(dropout=0.1), dict(rank_dropout=0.1)])
def test_refusals(bad):
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError):
        lorazoo.adapt(model, lorazoo.AdapterSpec.preset("flora_hao", targets=["fc1"], **bad))
    assert not any(isinstance(m, lorazoo.layer.AdaptedLayer) for m in model.modules())
