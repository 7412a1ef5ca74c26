"""NLoRA ([80]): SLoRA's B·N·A started from W0's first r columns, rows and their block (authors' code)."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, layer_input, single_layer, tiny_data, train

D = torch.float64


def _nlora(**kw):
    torch.manual_seed(0)
    W0 = torch.nn.Linear(20, 24).double().weight.detach().clone()  # what single_layer builds
    model, handle, layer = single_layer("moslora", rank=3, init="nlora", **kw)
    return W0, model, handle, layer


def test_factors_are_the_blocks_of_w0_and_the_start_is_not_the_base():
    W0, model, handle, layer = _nlora()
    form = layer.adapters["default"].form
    torch.testing.assert_close(form.A, W0[:3, :], rtol=0, atol=0)
    torch.testing.assert_close(form.B, W0[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(form.M, W0[:3, :3], rtol=0, atol=0)  # kept by moslora's after_factor_init
    torch.testing.assert_close(layer.base.weight.detach(), W0, rtol=0, atol=0)  # the base is untouched
    x = layer_input(features=20)
    s = form.scale
    ref = x @ (W0 + s * W0[:, :3] @ W0[:3, :3] @ W0[:3, :]).T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_pinv_mixer_is_the_nystrom_approximation_exact_on_a_rank_r_weight():
    g = torch.Generator().manual_seed(4)
    base = torch.nn.Linear(20, 24).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(24, 3, generator=g, dtype=D) @ torch.randn(3, 20, generator=g, dtype=D))
    W = base.weight.detach().clone()  # rank 3
    m = torch.nn.Sequential(base)
    lorazoo.adapt(m, lorazoo.AdapterSpec(form="moslora", rank=3, init="nlora", nlora_mixer="pinv", targets=["0"]))
    form = m[0].adapters["default"].form
    C, R, U = W[:, :3], W[:3, :], W[:3, :3]
    torch.testing.assert_close(form.M, torch.linalg.pinv(U), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(form.B @ form.M @ form.A, C @ torch.linalg.inv(U) @ R, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(form.B @ form.M @ form.A, W, rtol=1e-8, atol=1e-10)  # Nyström is exact at rank r


def test_shift_base_option_starts_as_the_base():
    W0, model, handle, layer = _nlora(nlora_shift_base=True)
    form = layer.adapters["default"].form
    x = layer_input(features=20)
    torch.testing.assert_close(layer(x), x @ W0.T + layer.base.bias.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.base.weight.detach(), W0 - form.scale * W0[:, :3] @ W0[:3, :3] @ W0[:3, :],
                               rtol=1e-12, atol=1e-13)


def test_trains_and_save_load_reproduces(tmp_path):
    x, _ = tiny_data()
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("nlora", rank=4, targets=["fc1", "fc2"]))
    losses = train(model, handle, steps=30, lr=1e-2)
    assert losses[-1] < 0.9 * losses[0]
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [dict(form="lora", init="nlora"), dict(form="moslora", init="nlora", nlora_mixer="inv"),
                                 dict(form="moslora", init="nlora", nlora_shift_base=1)])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError, match="nlora"):
        lorazoo.AdapterSpec(**bad)
