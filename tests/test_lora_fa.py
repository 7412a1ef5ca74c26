"""LoRA-FA ([101]; study Eq. 2-3): A frozen at its init, only B (and e.g. DoRA's m) trains."""
import pytest
import torch
import torch.nn.functional as F

import lorazoo
from lorazoo.optim.lora_fa import LoRAFA
from tiny import TinyNet, adapted, layer_input, single_layer, tiny_data, train


def test_forward_is_lora_with_the_initial_A():
    model, handle, layer = single_layer("lora", optim="lora_fa")
    form = layer.adapters["default"].form
    with torch.no_grad():
        form.B.copy_(torch.randn(form.B.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    x = layer_input(features=20)
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    ref = x @ W0.T + b + form.scale * x @ form.A.detach().T @ form.B.detach().T
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_A_is_frozen_has_no_optimizer_state_and_never_changes():
    model, handle = adapted(optim="lora_fa", modules_to_save=["head"])
    As = [getattr(model, n).adapters["default"].form.A for n in ("fc1", "fc2")]
    A0 = [A.detach().clone() for A in As]
    assert all(not A.requires_grad for A in As)
    ids = {id(p) for g in handle.param_groups(1e-2) for p in g["params"]}
    assert not ids & {id(A) for A in As}
    lora = adapted()[1].num_trainable()
    assert handle.num_trainable() == lora + sum(p.numel() for p in handle.saved_modules()["head"].parameters()) - sum(
        A.numel() for A in As)
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    for step in range(1, 6):
        model(x=x, labels=y).loss.backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
    assert all(A.grad is None for A in As)
    assert all(A not in opt.state for A in As)
    for A, a0 in zip(As, A0):
        torch.testing.assert_close(A, a0, rtol=0, atol=0)  # the same tensor, never written
    assert any(getattr(model, n).adapters["default"].form.B.abs().max() > 0 for n in ("fc1", "fc2"))
    handle.activate()  # re-activation keeps A frozen
    assert all(not A.requires_grad for A in As)


def test_sgd_update_is_eq3_exactly():
    """Eq. 3 (exact for frozen A): ΔW_t = −η s² Σ_i g_i A0ᵀ A0, with g_i = ∂L/∂W̃ at step i."""
    eta, steps = 0.05, 4
    model, handle, layer = single_layer("lora", optim="lora_fa")
    form = layer.adapters["default"].form
    A0, s = form.A.detach().clone(), form.scale
    x = layer_input(n=7, features=20)
    target = layer_input(n=7, features=24, seed=2)
    opt = torch.optim.SGD(handle.param_groups(eta))
    for step in range(1, steps + 1):
        F.mse_loss(layer(x), target).backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
    # dense reference: the weight W̃ = W0 + ΔW itself, ΔW moved by Eq. 3
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    dW = torch.zeros_like(W0)
    for _ in range(steps):
        Wt = (W0 + dW).clone().requires_grad_(True)
        F.mse_loss(x @ Wt.T + b, target).backward()
        dW = dW - eta * s * s * Wt.grad @ A0.T @ A0
    torch.testing.assert_close(form.delta_weight(W0), dW, rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_rank(dW).item() <= form.rank


def test_A_needs_no_stored_input_activation():
    """The memory claim: autograd keeps x for A's gradient in LoRA, not in LoRA-FA."""
    def saved_numel(optim):
        model, handle, layer = single_layer("lora", in_features=64, out_features=64, rank=2, optim=optim)
        x = layer_input(n=32, features=64)
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            layer(x).sum()
        return sum(total)
    lora, fa = saved_numel("default"), saved_numel("lora_fa")
    assert lora - fa >= 32 * 64  # x (tokens x in) is not kept
    assert fa <= 32 * 2 + 64 * 2 + 64 * 64  # at most A x, and the small factors


def test_composes_with_dora_and_survives_load(tmp_path):
    model, handle = adapted(form="dora", optim="lora_fa")
    forms = [getattr(model, n).adapters["default"].form for n in ("fc1", "fc2")]
    A0 = [f.A.detach().clone() for f in forms]
    m0 = [f.m.detach().clone() for f in forms]
    losses = train(model, handle, steps=20, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    for f, a0, m in zip(forms, A0, m0):
        torch.testing.assert_close(f.A, a0, rtol=0, atol=0)
        assert not torch.equal(f.m, m)  # DoRA's magnitude trains
    x, _ = tiny_data()
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-10, atol=1e-12)
    assert all(not ad.form.A.requires_grad for ad in loaded.adapters().values())
    assert all(ad.form.B.requires_grad for ad in loaded.adapters().values())


def test_refusals():
    with pytest.raises(lorazoo.SpecError, match="lora_fa"):
        lorazoo.AdapterSpec(form="vera", optim="lora_fa")  # no B·A factors
    with pytest.raises(lorazoo.SpecError, match="lora_fa"):
        lorazoo.AdapterSpec(form="lorma_plus", optim="lora_fa")  # multiplicative
    with pytest.raises(lorazoo.SpecError, match="zero"):
        lorazoo.AdapterSpec(optim="lora_fa", init="init_b_or_a", init_b_or_a_zero="A")
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError):
        lorazoo.adapt(model, lorazoo.AdapterSpec(optim="lora_fa", form="vera", targets=["fc1"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert LoRAFA.options == {}
