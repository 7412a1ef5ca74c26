"""BiLoRA ([61]): ΔW = s·P diag(λ) Q (AdaLoRA's form); P, Q (with gamma·R, study Eq. 35) move only on
D1 steps, λ only on D2 steps (a validation split, or every other training step)."""
import copy

import pytest
import torch
from torch import nn

import lorazoo
from tiny import TinyNet, perturb, tiny_data, train

R, GAMMA = 4, 0.1


def build(**kw):
    model = TinyNet()
    spec = lorazoo.AdapterSpec.preset("bilora", rank=R, targets=["fc1", "fc2"], **kw)
    return model, lorazoo.adapt(model, spec)


def forms(model):
    return [getattr(model, n).adapters["default"].form for n in ("fc1", "fc2")]


def orth(P, Q):
    eye = torch.eye(P.shape[1], dtype=P.dtype)
    return (P.T @ P - eye).square().sum() + (Q @ Q.T - eye).square().sum()


def reference_grads(model, batch):
    """∂(C + gamma·R)/∂(P, Q) and ∂C/∂λ by autograd on a copy."""
    ref = copy.deepcopy(model)
    fs = forms(ref)
    vec = [t for f in fs for t in (f.P, f.Q)]
    lam = [f.lam for f in fs]
    loss = ref(**batch).loss
    reg = sum(orth(f.P, f.Q) for f in fs)
    g_vec = torch.autograd.grad(loss + GAMMA * reg, vec)
    g_lam = torch.autograd.grad(ref(**batch).loss, lam)
    return g_vec, g_lam


def batch_of(seed, n=32):
    x, y = tiny_data(n, seed=seed)
    return {"x": x, "labels": y}


def test_update_is_the_pseudo_svd_and_starts_as_base():
    x, _ = tiny_data()
    model, handle = build()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)  # λ = 0
    perturb(handle)
    for f in forms(model):
        dense = sum(f.lam[j] * torch.outer(f.P[:, j], f.Q[j]) for j in range(R)) * f.scale
        torch.testing.assert_close(f.delta_weight(None), dense.detach(), rtol=1e-12, atol=1e-12)


def test_two_parameter_groups_cover_every_trainable_tensor_once():
    model, handle = build(bilora_values_lr_ratio=3.0)
    groups = handle.param_groups(1e-3)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(3e-3)
    vec = {id(t) for f in forms(model) for t in (f.P, f.Q)}
    lam = {id(f.lam) for f in forms(model)}
    assert {id(p) for p in groups[0]["params"]} == vec and {id(p) for p in groups[1]["params"]} == lam
    assert sum(len(g["params"]) for g in groups) == len(handle.trainable_parameters())


def test_stream_split_alternates_levels_with_exact_gradients():
    model, handle = build()
    perturb(handle)
    for step in (1, 2, 3, 4):
        batch = batch_of(20 + step)
        g_vec, g_lam = reference_grads(model, batch)
        model(**batch).loss.backward()
        handle.before_step(None)
        fs = forms(model)
        if step % 2:  # D1: P, Q with the orthogonality gradient; λ dropped
            for t, g in zip([t for f in fs for t in (f.P, f.Q)], g_vec):
                torch.testing.assert_close(t.grad, g, rtol=1e-9, atol=1e-12)
            assert all(f.lam.grad is None for f in fs)
        else:  # D2: λ alone
            for f, g in zip(fs, g_lam):
                torch.testing.assert_close(f.lam.grad, g, rtol=1e-9, atol=1e-12)
            assert all(f.P.grad is None and f.Q.grad is None for f in fs)
        for p in handle.trainable_parameters():
            p.grad = None
    assert handle.optim.upper_steps == 2


def test_validation_split_gives_values_their_own_gradient():
    model, handle = build()
    perturb(handle)
    val = batch_of(99)
    handle.optim.set_validation([val])
    train_batch = batch_of(5)
    g_vec, _ = reference_grads(model, train_batch)
    _, g_lam_val = reference_grads(model, val)
    model(**train_batch).loss.backward()
    handle.before_step(None)
    fs = forms(model)
    for t, g in zip([t for f in fs for t in (f.P, f.Q)], g_vec):
        torch.testing.assert_close(t.grad, g, rtol=1e-9, atol=1e-12)
    for f, g in zip(fs, g_lam_val):
        torch.testing.assert_close(f.lam.grad, g, rtol=1e-9, atol=1e-12)


def test_each_level_moves_only_on_its_own_steps_under_adamw():
    """With AdamW (momentum, weight decay), λ stays put on D1 steps and P, Q on D2 steps."""
    model, handle = build()
    perturb(handle)
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(1e-2, weight_decay=0.1))
    for step in range(1, 7):
        before = [(f.P.detach().clone(), f.Q.detach().clone(), f.lam.detach().clone()) for f in forms(model)]
        model(x=x, labels=y).loss.backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        for f, (P, Q, lam) in zip(forms(model), before):
            if step % 2:
                assert torch.equal(f.lam.detach(), lam) and not torch.equal(f.P.detach(), P)
            else:
                assert torch.equal(f.P.detach(), P) and torch.equal(f.Q.detach(), Q)
                assert not torch.equal(f.lam.detach(), lam)


def test_training_lowers_loss_and_state_round_trip():
    model, handle = build()
    losses = train(model, handle, steps=40, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    state = handle.optim.state_dict()
    other = build()[1].optim
    other.load_state_dict(state)
    assert (other.steps, other.upper_steps) == (40, 20)


@pytest.mark.parametrize("kw,match", [
    ({"form": "lora"}, "form='adalora'"),
    ({"bilora_interval": 0}, "bilora_interval"),
    ({"bilora_interval": 1.5}, "bilora_interval"),
    ({"bilora_orth_reg": -1.0}, "bilora_orth_reg"),
    ({"bilora_values_lr_ratio": 0.0}, "bilora_values_lr_ratio"),
])
def test_bad_options_refused_before_model_changes(kw, match):
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.adapt(model, lorazoo.AdapterSpec(**{"form": "adalora", "optim": "bilora", "rank": R,
                                                     "targets": ["fc1", "fc2"], **kw}))
    assert isinstance(model.fc1, nn.Linear)


def test_set_validation_refuses_non_batches():
    _, handle = build()
    with pytest.raises(lorazoo.LorazooError, match="set_validation"):
        handle.optim.set_validation([])
