"""LoRA-Dash ([83]): pre-launch LoRA for t steps, then a trainable diagonal on the k task-specific
directions of W0 (largest |u_iᵀ ΔW v_i| / σ_i)."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, layer_input, perturb, single_layer, tiny_data, train

D = torch.float64


def _dash(**kw):
    return single_layer("lora_dash", rank=3, **{"schedule": "lora_dash", "lora_dash_directions": 4,
                                                "lora_dash_warmup": 2, **kw})


def test_forward_and_delta_are_lora_plus_the_dash_term():
    model, handle, layer = _dash()
    form = layer.adapters["default"].form
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        form.U_top.copy_(torch.randn(24, 4, generator=g, dtype=D))
        form.V_top.copy_(torch.randn(4, 20, generator=g, dtype=D))
    perturb(handle)
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    U, Vt, d = form.U_top, form.V_top, form.d.detach()
    dW = form.scale * form.B.detach() @ form.A.detach() + sum(d[i] * torch.outer(U[:, i], Vt[i]) for i in range(4))
    x = layer_input(features=20)
    torch.testing.assert_close(layer(x), x @ (W0 + dW).T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(form.delta_weight(W0), dW, rtol=1e-12, atol=1e-12)


def test_task_specific_directions_are_the_top_change_rates():
    model, handle, layer = _dash()
    form = layer.adapters["default"].form
    perturb(handle)
    with torch.no_grad():
        form.d.zero_()  # as in training: d has no gradient before the directions exist
    W0 = layer.base.weight.detach()
    dW = form.scale * form.B.detach() @ form.A.detach()
    x = layer_input(features=20)
    out = layer(x).detach()
    handle.after_step(None, 1)  # still pre-launch
    assert (form.U_top == 0).all()
    handle.after_step(None, 2)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    rates = [abs(float(U[:, i] @ dW @ Vh[i])) / float(S[i]) for i in range(S.numel())]  # written from the paper
    top = sorted(range(len(rates)), key=lambda i: -rates[i])[:4]
    for j, i in enumerate(top):  # u_i v_iᵀ is independent of the SVD's sign choice
        torch.testing.assert_close(torch.outer(form.U_top[:, j], form.V_top[j]), torch.outer(U[:, i], Vh[i]),
                                   rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer(x), out, rtol=0, atol=1e-12)  # d = 0: no jump at the switch


def test_dash_diagonal_trains_only_after_the_pre_launch(tmp_path):
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("lora_tsd", rank=4, targets=["fc1", "fc2"],
                                                             lora_dash_warmup=10, lora_dash_directions=3))
    forms = [model.fc1.adapters["default"].form, model.fc2.adapters["default"].form]
    losses = train(model, handle, steps=10, lr=2e-2)
    assert all((f.d == 0).all() and f.U_top.abs().sum() > 0 for f in forms)  # found at step 10, not trained yet
    losses += train(model, handle, steps=9, lr=2e-2)  # a second run that never reaches its step 10
    assert all((f.d != 0).any() for f in forms) and losses[-1] < 0.9 * losses[0]
    x, _ = tiny_data()
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loaded.adapters()["fc1"].form.U_top, forms[0].U_top, rtol=0, atol=0)


def test_directions_are_capped_on_small_layers():
    model, handle, layer = single_layer("lora_dash", in_features=5, out_features=6, rank=2, schedule="lora_dash",
                                        lora_dash_directions=8)
    assert layer.adapters["default"].form.d.numel() == 5


@pytest.mark.parametrize("bad", [dict(form="lora_dash"), dict(schedule="lora_dash"),
                                 dict(form="lora_dash", schedule="lora_dash", lora_dash_directions=0),
                                 dict(form="lora_dash", schedule="lora_dash", lora_dash_warmup=0)])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError, match="lora_dash"):
        lorazoo.AdapterSpec(**bad)
