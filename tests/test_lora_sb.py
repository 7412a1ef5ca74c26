"""LoRA-SB ([131]): frozen B, A from the SVD of −η·sign(G); only the r x r core R trains."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, calibration_batches, tiny_data, train

D = torch.float64
ETA = 1e-2


def _adapted(**kw):
    model = TinyNet()
    spec = lorazoo.AdapterSpec.preset("lora_sb", rank=4, targets=["fc1", "fc2"], lora_sb_eta=ETA, **kw)
    return model, lorazoo.adapt(model, spec, calibration=calibration_batches())


def _reference_gradients():
    """G = dL/dW0 of fc1 and fc2 over the calibration batches, by plain autograd on the base model."""
    model = TinyNet()
    grads = {"fc1": 0, "fc2": 0}
    for batch in calibration_batches():
        model.zero_grad()
        model(**batch).loss.backward()
        for n in grads:
            grads[n] = grads[n] + getattr(model, n).weight.grad.clone()
    return grads


def test_start_is_the_best_rank_r_approximation_of_the_first_adam_step():
    model, handle = _adapted()
    for n, G in _reference_gradients().items():
        dW = -ETA * torch.sign(G)
        U, S, Vh = torch.linalg.svd(dW)
        best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # Eckart-Young: the optimal rank-4 approximation
        layer = getattr(model, n)
        form = layer.adapters["default"].form
        torch.testing.assert_close(form.delta_weight(layer.base.weight), best, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(form.B.T @ form.B, torch.eye(4, dtype=D), rtol=0, atol=1e-10)
        torch.testing.assert_close(form.A @ form.A.T, torch.eye(4, dtype=D), rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.diag(form.M) * form.scale, S[:4], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(layer.base.weight, getattr(TinyNet(), n).weight, rtol=0, atol=0)  # no shift
    x, _ = tiny_data()
    ref = TinyNet()
    with torch.no_grad():
        for n in ("fc1", "fc2"):
            layer = getattr(model, n)
            getattr(ref, n).weight += layer.adapters["default"].form.delta_weight(layer.base.weight)
    torch.testing.assert_close(model(x=x).logits, ref(x=x).logits, rtol=1e-10, atol=1e-12)


def test_only_the_core_trains_and_updates_stay_in_the_frozen_subspaces(tmp_path):
    model, handle = _adapted()
    forms = [getattr(model, n).adapters["default"].form for n in ("fc1", "fc2")]
    frozen = [(f.B.detach().clone(), f.A.detach().clone(), f.M.detach().clone()) for f in forms]
    assert handle.num_trainable() == 2 * 4 * 4  # r² per layer
    losses = train(model, handle, steps=30, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    for f, (B, A, M) in zip(forms, frozen):
        torch.testing.assert_close(f.B, B, rtol=0, atol=0)
        torch.testing.assert_close(f.A, A, rtol=0, atol=0)
        assert not torch.allclose(f.M, M)
        dW = f.delta_weight(None)
        torch.testing.assert_close(B @ B.T @ dW @ A.T @ A, dW, rtol=1e-10, atol=1e-12)  # in span(B) x span(Aᵀ)
    x, _ = tiny_data()
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-12, atol=1e-12)
    assert [p.shape for p in loaded.trainable_parameters()] == [(4, 4), (4, 4)]


def test_composes_with_a_factor_init_as_lora_xs():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="lora_sb", init="pissa", rank=4, targets=["fc1", "fc2"]))
    x, _ = tiny_data()
    torch.testing.assert_close(model(x=x).logits, TinyNet()(x=x).logits, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(ad.form.M, torch.eye(4, dtype=D)) for ad in handle.adapters().values())


@pytest.mark.parametrize("bad", [dict(form="lora_sb"), dict(form="lora_sb", init="init_b_or_a"),
                                 dict(init="lora_sb"), dict(form="moslora", init="lora_sb"),
                                 dict(form="lora_sb", init="lora_sb", lora_sb_eta=0),
                                 dict(form="lora_sb", init="lora_sb", lora_sb_niter=-1)])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError, match="lora_sb"):
        lorazoo.AdapterSpec(**bad)


def test_needs_calibration_before_any_change():
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError, match="calibration"):
        lorazoo.adapt(model, lorazoo.AdapterSpec.preset("lora_sb", targets=["fc1"]))
    assert type(model.fc1) is torch.nn.Linear
