"""MultiLoRA [93]: n parallel LoRA modules with learnable scaling factors, non-zero B, zero scales."""
import math

import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, single_layer, tiny_data, trains_and_reloads


def _form(layer):
    return layer.adapters["default"].form


def _delta(f):
    """ΔW = s·Σ_i λ_i B_i A_i, module by module."""
    r = f.module_rank
    B, A, lam = f.B.detach(), f.A.detach(), f.scales.detach()
    return f.scale * sum(lam[i] * B[:, i * r:(i + 1) * r] @ A[i * r:(i + 1) * r] for i in range(f.modules_n))


@pytest.mark.parametrize("rank,n", [(8, 8), (8, 4), (6, 4), (3, 1)])
def test_matches_the_sum_of_scaled_modules(rank, n):
    model, handle, layer = single_layer("multilora", rank=rank, alpha=6, multilora_modules=n)
    perturb(handle)
    f = _form(layer)
    assert f.module_rank == -(-rank // n) and f.A.shape == (n * f.module_rank, 20)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    W = layer.base.weight.detach()
    ref = x @ (W + _delta(f)).T + layer.base.bias.detach()
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f.delta_weight(W), _delta(f), rtol=1e-9, atol=1e-12)


def test_init_is_kaiming_factors_and_zero_scales_so_it_starts_as_base():
    x, _ = tiny_data()
    model, handle = adapted("multilora", rank=8, multilora_modules=4)  # rank-2 modules
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        assert torch.count_nonzero(f.scales) == 0
        assert f.A.abs().max() <= 1 / math.sqrt(layer.in_features) and torch.count_nonzero(f.A) == f.A.numel()
        assert f.B.abs().max() <= 1 / math.sqrt(2) and torch.count_nonzero(f.B) == f.B.numel()  # B is not zero
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)


def test_first_gradient_reaches_the_scales_only():
    model, handle, layer = single_layer("multilora", rank=4, multilora_modules=4)
    model(torch.randn(5, 20, dtype=torch.float64)).sum().backward()
    f = _form(layer)
    assert torch.all(f.scales.grad != 0)
    assert torch.count_nonzero(f.A.grad) == 0 and torch.count_nonzero(f.B.grad) == 0


def test_merge_unmerge_and_never_forms_the_dense_update_in_forward():
    model, handle = adapted("multilora", rank=8)
    perturb(handle)
    x, _ = tiny_data()
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-9, atol=1e-12)
    handle.unmerge()
    model, handle, layer = single_layer("multilora", rank=8)
    perturb(handle)
    f = _form(layer)
    xin = torch.randn(5, 20, dtype=torch.float64)
    shapes = op_shapes(lambda: f(xin, torch.zeros(5, 24, dtype=torch.float64), None, None).sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes


def test_trains_and_save_load(tmp_path):
    model, handle = adapted("multilora", rank=8)
    trains_and_reloads(model, handle, tmp_path)
    assert all(torch.count_nonzero(_form(layer).scales) > 0 for layer in (model.fc1, model.fc2))


def test_rank_dropout_masks_units():
    model, handle, layer = single_layer("multilora", rank=4, multilora_modules=2)
    perturb(handle)
    f = _form(layer)
    x = layer_input(features=20)
    mask = torch.tensor([0.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    out = f(x, torch.zeros(5, 24, dtype=torch.float64), None, mask)
    ref = x @ (f.scale * (f.B.detach() * (f.scales.detach().repeat_interleave(2) * mask)) @ f.A.detach()).T
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)


def test_preset():
    spec = lorazoo.AdapterSpec.preset("multilora")
    assert (spec.form, spec.rank, spec.options["multilora_modules"]) == ("multilora", 8, 8)


@pytest.mark.parametrize("kw,match", [
    ({"multilora_modules": 0}, "multilora_modules"), ({"multilora_modules": 2.5}, "multilora_modules"),
    ({"multilora_modules": 300}, "multilora_modules"), ({"init": "pissa"}, "init 'pissa'"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="multilora", **kw)
