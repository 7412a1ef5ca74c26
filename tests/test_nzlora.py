"""NZLoRA (study Eq. 89, [76]): A0 ~ U(±sqrt(gamma_A/m)), B0 ~ U(±sqrt(gamma_B/m)), m = in features;
no base manipulation, so the model does NOT start as the base model."""
import math

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.registry import FORMS, INITS
from tiny import TinyNet, adapted, layer_input, tiny_data

R, ALPHA = 4, 8.0
S_LORA = ALPHA / R


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def wide_layer(rank=8, **kw):
    """One float64 nn.Linear(400 -> 300) with an nzlora adapter: enough draws for moment checks."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 300)).double()
    W0 = net[0].weight.detach().clone()
    lorazoo.adapt(net, lorazoo.AdapterSpec(rank=rank, alpha=16, init="nzlora", targets=["0"], **kw))
    return net, W0


def test_draws_are_uniform_with_the_variance_scaled_bounds():
    net, _ = wide_layer(nzlora_gamma_a=16.0, nzlora_gamma_b=4.0)
    f = net[0].adapters["default"].form
    for t, gamma in ((f.A, 16.0), (f.B, 4.0)):
        bound = math.sqrt(gamma / 400)  # both bounds use the layer's input size m
        t = t.detach()
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.98 * bound  # the draw fills its support
        # U(-b, b): mean 0, variance b²/3 (gamma times Kaiming-uniform's 1/(3m))
        assert abs(t.mean().item()) < 0.05 * bound
        torch.testing.assert_close(t.var().item(), bound ** 2 / 3, rtol=0.06, atol=0)


def test_gamma_one_is_kaiming_uniforms_bound():
    net, _ = wide_layer(nzlora_gamma_a=1.0, nzlora_gamma_b=1.0)
    A = net[0].adapters["default"].form.A.detach()
    assert 0.98 / math.sqrt(400) < A.abs().max() <= 1 / math.sqrt(400)  # LoRA's A bound 1/sqrt(fan_in)


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_forward_matches_dense_reference_and_base_is_untouched(layer):
    W0 = getattr(TinyNet(), layer).weight.detach()
    model, _ = adapted(rank=R, alpha=ALPHA, init="nzlora")
    lay, f = getattr(model, layer), _form(model, layer)
    B, A = f.B.detach(), f.A.detach()
    assert B.abs().min() > 0 and A.abs().min() > 0  # both factors non-zero
    # no pretrained-weight manipulation: W0 as it was, no recorded shift
    torch.testing.assert_close(lay.linear_weight().detach(), W0, rtol=0, atol=0)
    assert lay.adapters["default"].shift_A.shape[0] == 0
    x = layer_input(features=W0.shape[1])
    ref = x @ (W0 + S_LORA * B @ A).T + lay.base.bias
    torch.testing.assert_close(lay(x), ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(f.delta_weight(W0), S_LORA * B @ A, rtol=1e-6, atol=1e-12)


def test_does_not_start_as_base_and_delete_restores_it():
    x, _ = tiny_data()
    base = TinyNet()(x).logits
    model, handle = adapted(rank=R, alpha=ALPHA, init="nzlora")
    assert not INITS.get("nzlora").obj.starts_as_base
    assert (model(x).logits - base).abs().max() > 1e-3
    handle.delete()
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)


def test_both_factors_get_a_gradient_at_the_first_step():
    """The paper's point: with B0 = 0 (LoRA) A's first gradient vanishes; with Init[AB] it does not."""
    x, y = tiny_data()
    grads = {}
    for init in ("default", "nzlora"):
        model, _ = adapted(rank=R, alpha=ALPHA, init=init)
        model(x=x, labels=y).loss.backward()
        grads[init] = _form(model).A.grad.abs().max().item()
    assert grads["default"] == 0 and grads["nzlora"] > 0


def test_seeded_and_reproducible():
    a = _form(adapted(rank=R, init="nzlora", seed=3)[0]).A.detach()
    b = _form(adapted(rank=R, init="nzlora", seed=3)[0]).A.detach()
    c = _form(adapted(rank=R, init="nzlora", seed=4)[0]).A.detach()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


@pytest.mark.skipif("dora" not in FORMS.names(), reason="no dora form")
def test_with_dora_starts_at_w0_plus_sba():
    """DoRA's magnitude is the row norm of W0 + s·B0·A0: W' = W0 + s·B0·A0, not the base."""
    model, _ = adapted("dora", rank=R, alpha=ALPHA, init="nzlora")
    lay, f = model.fc2, _form(model)
    W0 = TinyNet().fc2.weight.detach()
    W_start = W0 + S_LORA * f.B.detach() @ f.A.detach()
    torch.testing.assert_close(f.m.detach(), W_start.norm(dim=1), rtol=1e-6, atol=1e-12)
    x = layer_input()
    torch.testing.assert_close(lay(x), x @ W_start.T + lay.base.bias, rtol=1e-6, atol=1e-12)


def test_with_rslora_the_draws_are_the_same_and_the_scale_is_sqrt_r():
    plain, _ = adapted(rank=R, alpha=ALPHA, init="nzlora")
    rs, _ = adapted(rank=R, alpha=ALPHA, init="nzlora", scale="rslora")
    torch.testing.assert_close(_form(rs).A, _form(plain).A, rtol=0, atol=0)
    W0 = TinyNet().fc2.weight.detach()
    torch.testing.assert_close(_form(rs).delta_weight(W0), ALPHA / math.sqrt(R) * _form(rs).B @ _form(rs).A,
                               rtol=1e-6, atol=1e-12)


@pytest.mark.skipif("moslora" not in FORMS.names(), reason="no moslora form")
def test_with_moslora_the_update_is_s_b_a():
    model, _ = adapted("moslora", rank=R, alpha=ALPHA, init="nzlora")
    f = _form(model)
    torch.testing.assert_close(f.M.detach(), torch.eye(R, dtype=torch.float64), rtol=0, atol=0)
    W0 = TinyNet().fc2.weight.detach()
    torch.testing.assert_close(f.delta_weight(W0), S_LORA * f.B @ f.A, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("form", [f for f in ("vera", "loha", "lokr", "hydralora") if f in FORMS.names()])
def test_forms_without_plain_factors_are_refused_naming_both(form):
    with pytest.raises(lorazoo.SpecError, match=rf"(?s)'nzlora'.*'{form}'"):
        lorazoo.AdapterSpec(form=form, init="nzlora")


@pytest.mark.parametrize("key", ["nzlora_gamma_a", "nzlora_gamma_b"])
@pytest.mark.parametrize("value", [0, -1.0, "16", float("nan")])
def test_bad_gammas_are_refused(key, value):
    with pytest.raises(lorazoo.SpecError, match=key):
        lorazoo.AdapterSpec(init="nzlora", **{key: value})


def test_preset_follows_the_study():
    spec = lorazoo.AdapterSpec.preset("nzlora")
    assert spec.init == "nzlora" and spec.form == "lora"
    assert spec.options["nzlora_gamma_a"] == 16 and spec.options["nzlora_gamma_b"] == 16
