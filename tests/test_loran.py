"""LoRAN (Li, Song, Hou 2024 [74]; authors' code): ΔW = s·f(B A), f(z) = z + a·z·sin(ωz) entrywise (Sinter)."""
import numpy as np
import pytest
import torch

import lorazoo
from lorazoo.forms.dense import DenseLinear
from tiny import TinyNet, adapted, layer_input, perturb, single_layer, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def _sinter(z, a, w):
    return z + a * z * np.sin(w * z)


def _reference_delta(layer, scale, a, w, mask=None):
    """s·Sinter(B diag(m) A) in numpy: the authors' get_delta_weight (one transformation, no P, no b)."""
    f = _form(layer)
    A, B = f.A.detach().numpy(), f.B.detach().numpy()
    m = np.ones(A.shape[0]) if mask is None else mask.numpy()
    return torch.from_numpy(scale * _sinter((B * m) @ A, a, w))


def _reference(layer, x, scale, a, w):
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    return x @ (W0 + _reference_delta(layer, scale, a, w)).T + b


@pytest.mark.parametrize("a,w", [(5e-5, 1e4), (0.3, 7.0), (1.0, 0.5)])
def test_matches_dense_reference(a, w):
    model, handle = adapted("loran", rank=3, alpha=6, loran_amplitude=a, loran_frequency=w)
    perturb(handle)
    x = layer_input(n=8).reshape(2, 4, 16)
    torch.testing.assert_close(model.fc2(x), _reference(model.fc2, x, 2.0, a, w), rtol=1e-10, atol=1e-12)
    dw = _form(model.fc2).delta_weight(model.fc2.linear_weight())
    torch.testing.assert_close(dw, _reference_delta(model.fc2, 2.0, a, w), rtol=1e-12, atol=1e-14)


def test_defaults_are_the_released_configuration():
    model, handle = adapted("loran", rank=4)
    f = _form(model.fc1)
    assert (f.amplitude, f.frequency) == (5e-5, 1e4)
    assert f.scale == 16 / 4  # alpha / r
    assert handle.num_trainable() == sum(4 * i + o * 4 for i, o in ((12, 16), (16, 16)))  # LoRA's count


def test_starts_as_base():
    x, _ = tiny_data()
    model, handle = adapted("loran", rank=4)
    assert torch.count_nonzero(_form(model.fc1).B) == 0 and _form(model.fc1).A.abs().min() > 0
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)


def test_zero_amplitude_is_lora():
    x, _ = tiny_data()
    lora_model, lora = adapted("lora", rank=3, alpha=5)
    perturb(lora)
    loran_model, loran = adapted("loran", rank=3, alpha=5, loran_amplitude=0.0)
    with torch.no_grad():
        for a, b in zip(loran.trainable_parameters(), lora.trainable_parameters()):
            a.copy_(b)
    torch.testing.assert_close(loran_model(x).logits, lora_model(x).logits, rtol=1e-10, atol=1e-12)


def test_update_is_full_rank():
    """The paper's point: Sinter of a rank-r product is not rank r."""
    model, handle, layer = single_layer("loran", in_features=20, out_features=24, rank=2)
    perturb(handle)
    dw = _form(layer).delta_weight(layer.linear_weight())
    B, A = _form(layer).B.detach(), _form(layer).A.detach()
    assert torch.linalg.matrix_rank(B @ A) == 2
    assert torch.linalg.matrix_rank(dw) == 20  # min(in, out), with the default a = 5e-5, ω = 1e4


def test_merge_unmerge_exact():
    x, _ = tiny_data()
    model, handle = adapted("loran", rank=3, loran_amplitude=0.5, loran_frequency=3.0)
    perturb(handle)
    before = model.fc2.base.weight.detach().clone()
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model.fc2.base.weight, before + _reference_delta(model.fc2, 16 / 3, 0.5, 3.0))
    torch.testing.assert_close(model(x).logits, out, rtol=1e-10, atol=1e-12)
    handle.unmerge()
    torch.testing.assert_close(model.fc2.base.weight, before, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("init", [True, False])
def test_gradient_reaches_every_trainable_tensor(init):
    model, handle = adapted("loran", rank=3)
    if not init:
        perturb(handle)
    x, y = tiny_data()
    model(x=x, labels=y).loss.backward()
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        assert f.B.grad.abs().sum() > 0
        assert (f.A.grad.abs().sum() > 0) == (not init)  # B = 0 stops A's gradient at init, as in LoRA


def test_sinter_update_gradient():
    """x (s·f(BA))ᵀ through the shared dense function with LoRAN's hand-written f'(P) = 1 + a·sin(ωP) +
    a·ω·P·cos(ωP), against finite differences."""
    model, handle, layer = single_layer("loran", in_features=4, out_features=5, rank=2, alpha=3,
                                        loran_amplitude=0.7, loran_frequency=9.0)
    form = layer.adapters["default"].form
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    B = (torch.rand(5, 2, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    A = (torch.rand(2, 4, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, B, A: DenseLinear.apply(x, form, None, B, A, None, False), (x, B, A))


def test_rank_dropout_masks_inside_the_product():
    model, handle = adapted("loran", rank=2, alpha=2, loran_amplitude=0.5, loran_frequency=4.0)
    perturb(handle)
    layer, x = model.fc2, layer_input()
    mask = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = _form(layer)(x, torch.zeros(5, 16, dtype=torch.float64), None, mask)
    torch.testing.assert_close(out, x @ _reference_delta(layer, 1.0, 0.5, 4.0, mask).T, rtol=1e-10, atol=1e-12)


def test_autograd_keeps_no_dense_tensor():
    """No factored form exists; autograd keeps x, B and A only (B·A, ΔW, sin, cos are recomputed in backward)."""
    model, handle, layer = single_layer("loran", in_features=20, out_features=24, rank=3)
    perturb(handle)
    x = layer_input(n=7, features=20).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        _form(layer)(x, torch.zeros(7, 24, dtype=torch.float64), None, None)
    assert saved and not any(s in ((24, 20), (20, 24)) for s in saved)


def test_loraplus_and_rslora():
    model, handle = adapted("loran", rank=4, alpha=8, scale="rslora", optim="loraplus")
    f = _form(model.fc1)
    assert f.scale == pytest.approx(4.0)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in handle.param_groups(1e-3)}
    assert id(f.B) in groups["B"] and id(f.A) in groups["A"]


@pytest.mark.parametrize("init", ["pissa", "milora", "lora_ga", "eva"])
def test_factor_inits_refused(init):
    with pytest.raises(lorazoo.SpecError, match=rf"init '{init}'.*form 'loran'"):
        lorazoo.AdapterSpec(form="loran", init=init)


@pytest.mark.parametrize("part", [dict(schedule="relora"), dict(optim="lora_pro")])
def test_parts_relying_on_plain_b_a_refused(part):
    with pytest.raises(lorazoo.SpecError, match="loran"):
        lorazoo.AdapterSpec(form="loran", **part)


@pytest.mark.parametrize("key,value", [("loran_amplitude", -1e-5), ("loran_amplitude", "5e-5"),
                                       ("loran_frequency", float("inf")), ("loran_frequency", -3)])
def test_bad_options_refused(key, value):
    with pytest.raises(lorazoo.SpecError, match=key):
        lorazoo.AdapterSpec(form="loran", **{key: value})
