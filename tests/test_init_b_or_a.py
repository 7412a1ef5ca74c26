"""Hayou et al. ([77]): which factor starts at zero, and the learning-rate consequence."""
import math

import pytest
import torch
from torch import nn

import lorazoo
from tiny import TinyNet, adapted, single_layer, tiny_data, train


@pytest.mark.parametrize("zero", ["B", "A"])
def test_one_factor_zero_the_other_kaiming_uniform(zero):
    model, handle, layer = single_layer("lora", in_features=40, out_features=30, rank=5, init="init_b_or_a",
                                        init_b_or_a_zero=zero)
    form = layer.adapters["default"].form
    zeroed, drawn = (form.B, form.A) if zero == "B" else (form.A, form.B)
    assert (zeroed == 0).all()
    bound = 1 / math.sqrt(drawn.shape[1])  # U(±1/sqrt(fan_in)): fan_in = in for A, r for B
    assert drawn.abs().max() <= bound and drawn.abs().max() > 0.8 * bound
    assert drawn.std() > 0.8 * bound / math.sqrt(3)
    x = torch.randn(6, 40, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)  # the base model at init


def test_B_zero_is_the_default_init_of_lora():
    a = adapted(init="init_b_or_a")[0].fc1.adapters["default"].form
    b = adapted()[0].fc1.adapters["default"].form
    torch.testing.assert_close(a.A, b.A, rtol=0, atol=0)
    torch.testing.assert_close(a.B, b.B, rtol=0, atol=0)


def _first_step(zero, n, seed):
    """(Δf, aᵀx, b0, ‖x‖²) after one SGD step on ½(f − y)² with f0 − y = −1, f = w·x + s·b·aᵀx (r = 1)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, 1, bias=False)).double()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=1, alpha=1, targets=["0"], init="init_b_or_a",
                                                      init_b_or_a_zero=zero, seed=seed))
    form = model[0].adapters["default"].form
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    a, b = form.A.detach().clone(), form.B.detach().clone()
    f0 = model(x).detach()
    opt = torch.optim.SGD(handle.param_groups(1e-3))
    (0.5 * (model(x) - (f0 + 1)) ** 2).sum().backward()
    opt.step()
    return (model(x) - f0).item() / 1e-3, (a @ x.T).item(), b.item(), x.square().sum().item()


def test_first_step_matches_the_toy_model_and_scales_as_the_paper_says():
    """B = 0: Δf = η s² (aᵀx)², Θ(η) in the width n. A = 0: Δf = η s² b² ‖x‖², Θ(η n). So with A = 0 the
    learning rate must shrink like 1/n for a bounded step (Hayou et al.'s Θ(n^-1) vs Θ(n^-1/2))."""
    growth = {}
    for zero in ("B", "A"):
        mean = {}
        for n in (64, 1024):
            steps = []
            for seed in range(30):
                df, ax, b, xx = _first_step(zero, n, seed)
                expected = ax ** 2 if zero == "B" else b ** 2 * xx  # s = alpha / r = 1
                assert df == pytest.approx(expected, rel=1e-6)
                steps.append(df)
            mean[n] = sum(steps) / len(steps)
        growth[zero] = mean[1024] / mean[64]
    assert 0.33 < growth["B"] < 3.0       # width-independent first step with B zero
    assert 9.0 < growth["A"] < 28.0       # grows like n (16x here) with A zero


def test_A_zero_trains_and_saves(tmp_path):
    model, handle = adapted(init="init_b_or_a", init_b_or_a_zero="A")
    losses = train(model, handle, steps=30, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    x, _ = tiny_data()
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-12, atol=1e-12)


def test_composes_with_dora_and_starts_as_base():
    x, _ = tiny_data()
    model, handle = adapted(form="dora", init="init_b_or_a", init_b_or_a_zero="A")
    torch.testing.assert_close(model(x=x).logits, TinyNet()(x=x).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["a", "both", 0, None])
def test_bad_option_refused(bad):
    with pytest.raises(lorazoo.SpecError, match="init_b_or_a_zero"):
        lorazoo.AdapterSpec(init="init_b_or_a", init_b_or_a_zero=bad)


def test_forms_without_factors_refused():
    with pytest.raises(lorazoo.SpecError, match="init_b_or_a"):
        lorazoo.AdapterSpec(form="vera", init="init_b_or_a")
