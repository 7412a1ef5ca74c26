"""GOAT (study Eq. 124-126, 132 [90]): SVD-segment experts, residual base, derived scale, Switch loss."""
import math

import pytest
import torch
from torch import nn

import lorazoo
from moe_reference import mixture_output, route, switch
from tiny import TinyNet, adapted, perturb, reloads_equal, single_layer, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def _goat_layer(E=4, rank=8, fin=20, fout=24, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(fin, fout)).double()
    W0 = model[0].weight.detach().clone()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="goat", init="goat", rank=rank, experts=E,
                                                      targets=["0"], **kw))
    return model, handle, model[0], W0


@pytest.mark.parametrize("rho", [10.0, 1.0])
def test_experts_are_svd_segments_and_the_base_keeps_the_residual(rho):
    E, rank = 4, 8  # r_e = 2; min(20, 24) = 20 triplets in segments of 5: expert i takes 5i, 5i+1
    model, handle, layer, W0 = _goat_layer(E, rank, goat_rho=rho)
    f = _form(layer)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    s = math.sqrt(3 * 20 / 2)
    assert f.scale == pytest.approx(s)
    total = torch.zeros_like(W0)
    for i in range(E):
        B_i, A_i = f.expert(i)
        seg = [5 * i, 5 * i + 1]
        # Eq. 132 with the code's ρ: s·B_i A_i = U_i Σ_i V_iᵀ / ρ (sign-free product)
        torch.testing.assert_close(s * B_i @ A_i, U[:, seg] @ torch.diag(S[seg]) @ Vh[seg] / rho, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(B_i.norm(dim=0), (S[seg] / (s * rho)).sqrt(), rtol=1e-9, atol=0)
        torch.testing.assert_close(A_i.norm(dim=1), (S[seg] / (s * rho)).sqrt(), rtol=1e-9, atol=0)
        total = total + B_i @ A_i
    torch.testing.assert_close(layer.base.weight, W0 - (s / E) * total, rtol=1e-9, atol=1e-12)


def test_starts_as_the_base_on_average_over_routing():
    """With every gate 1/E (dense router, zero W_g) the output is W0 x exactly; top-k is not."""
    x = torch.randn(6, 20, dtype=torch.float64)
    model, handle, layer, W0 = _goat_layer(top_k=4)
    with torch.no_grad():
        _form(layer).gate.weight.zero_()
    torch.testing.assert_close(model(x), x @ W0.T + layer.base.bias, rtol=1e-9, atol=1e-12)
    model, handle, layer, W0 = _goat_layer(top_k=2)
    assert not torch.allclose(model(x), x @ W0.T + layer.base.bias)
    assert lorazoo.AdapterSpec.preset("goat").part_classes()["init"].starts_as_base is False


def test_matches_dense_reference_per_token():
    model, handle, layer, _ = _goat_layer(E=4, rank=8, top_k=2)
    perturb(handle)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    f = _form(layer)
    ref = mixture_output(x, layer.base.weight.detach(), layer.base.bias.detach(), f.A.detach(), f.B.detach(),
                         f.gate.weight.detach(), 4, 2, math.sqrt(3 * 20 / 2))
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)


def test_preset_is_eight_rank_one_experts_top_two():
    spec = lorazoo.AdapterSpec.preset("goat")
    assert (spec.form, spec.init, spec.rank, spec.options["experts"], spec.options["top_k"]) == ("goat", "goat", 8, 8, 2)
    assert spec.options["goat_rho"] == 10 and spec.options["goat_aux_weight"] == 1e-3
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec.preset("goat", targets=["fc1", "fc2"]))
    for layer, n in ((model.fc1, 12), (model.fc2, 16)):
        f = _form(layer)
        assert (f.experts, f.expert_rank, f.gate.top_k) == (8, 1, 2)
        assert f.scale == pytest.approx(math.sqrt(3 * n))  # s = sqrt(3·η·n / r_e), η = 1


def test_scale_options():
    _, _, layer = single_layer("goat", rank=4, experts=2, goat_eta=2.0)
    assert _form(layer).scale == pytest.approx(math.sqrt(3 * 2.0 * 20 / 2))
    _, _, layer = single_layer("goat", rank=4, experts=2, goat_scale="spec", scale="rslora", alpha=8)
    assert _form(layer).scale == pytest.approx(8 / 2)  # the scale part: alpha / sqrt(rank)
    with pytest.raises(lorazoo.SpecError, match="goat_scale='spec'"):
        lorazoo.AdapterSpec(form="goat", scale="rslora")


def test_switch_loss_reaches_handle_and_router():
    model, handle, layer, _ = _goat_layer(E=4, rank=8, top_k=2, goat_aux_weight=0.5)
    f = _form(layer)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    model.train()
    model(x)
    probs, _, chosen = route(x, f.gate.weight.detach(), 2)
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, 0.5 * switch(probs, chosen), rtol=1e-9, atol=0)
    loss.backward()
    assert f.gate.weight.grad.abs().sum() > 0
    model.eval()
    model(x)
    assert handle.aux_loss() == 0


def test_goat_init_on_loramoe_and_default_init_on_goat():
    model, handle = adapted("loramoe", rank=2, experts=2, init="goat")
    assert torch.count_nonzero(_form(model.fc1).B) > 0
    x, _ = tiny_data()
    model, handle = adapted("goat", rank=8, experts=4, init="default")  # LoRA's init: starts as the base
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


def test_segments_too_short_refused_before_the_model_changes():
    model = TinyNet()
    spec = lorazoo.AdapterSpec(form="goat", init="goat", rank=16, experts=8, targets=["fc1", "fc2"])
    with pytest.raises(lorazoo.SpecError, match="segments of 1, fewer than the 2"):
        lorazoo.adapt(model, spec)
    assert isinstance(model.fc1, nn.Linear) and all(p.requires_grad for p in model.parameters())


def test_save_load_and_delete_restore(tmp_path):
    x, _ = tiny_data()
    model, handle = adapted("goat", rank=8, experts=4, init="goat")
    perturb(handle)
    loaded = reloads_equal(model, handle, tmp_path)
    fresh = loaded.model
    loaded.delete()
    torch.testing.assert_close(fresh(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)


def test_not_mergeable():
    model, handle = adapted("goat", rank=8, experts=4, init="goat")
    with pytest.raises(lorazoo.NotMergeableError):
        handle.merge()


@pytest.mark.parametrize("kw,match", [
    ({"goat_scale": "alpha"}, "goat_scale"), ({"goat_eta": 0}, "goat_eta"), ({"goat_aux_weight": -1}, "goat_aux"),
    ({"init": "goat", "goat_rho": 0}, "goat_rho"), ({"experts": 2, "top_k": 3}, "top_k"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="goat", **kw)


def test_goat_init_needs_a_mixture():
    with pytest.raises(lorazoo.SpecError, match="init 'goat'.*form 'lora'"):
        lorazoo.AdapterSpec(form="lora", init="goat")
