"""AutoLoRA ([58]): ΔW = s·B diag(g) A with g = softmax(z) while searching; z takes first-order Adam
steps on ∇_z L_val after each training step; then rank j is kept iff g_j >= 1/r and retrained."""
import copy
import math

import pytest
import torch
from torch import nn

import lorazoo
from tiny import TinyNet, perturb, tiny_data, train

R, ALPHA, LR = 4, 8.0, 0.05


def build(**kw):
    model = TinyNet()
    kw = {"form": "autolora", "schedule": "autolora", "rank": R, "alpha": ALPHA, "autolora_lr": LR, **kw}
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(targets=["fc1", "fc2"], **kw))
    return model, handle


def val_batch():
    x, y = tiny_data(32, seed=9)
    return {"x": x, "labels": y}


def set_logits(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            z = getattr(model, name).adapters["default"].form.logits
            z.copy_(torch.randn(z.shape, generator=g, dtype=z.dtype))


def dense_model(model, gates):
    """TinyNet with W0 + s·B diag(g) A written densely from the adapted model's tensors."""
    ref = TinyNet()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            f = getattr(model, name).adapters["default"].form
            B, A = f.B.detach(), f.A.detach()
            dW = sum(gates[name][j] * torch.outer(B[:, j], A[j]) for j in range(R)) * (ALPHA / R)
            getattr(ref, name).weight.add_(dW)
    return ref


def test_starts_as_base_and_output_matches_dense_reference_while_searching():
    x, _ = tiny_data()
    model, handle = build()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)
    perturb(handle)
    set_logits(model)
    gates = {n: torch.softmax(getattr(model, n).adapters["default"].form.logits.detach(), 0) for n in ("fc1", "fc2")}
    torch.testing.assert_close(model(x).logits, dense_model(model, gates)(x).logits, rtol=1e-10, atol=1e-12)
    W0 = TinyNet().fc2.weight.detach()
    f = model.fc2.adapters["default"].form
    torch.testing.assert_close(f.delta_weight(W0), dense_model(model, gates).fc2.weight.detach() - W0,
                               rtol=1e-10, atol=1e-12)


def test_selection_logits_are_outside_the_training_optimizer():
    model, handle = build()
    ids = {id(p) for p in handle.trainable_parameters()}
    ids_groups = {id(p) for g in handle.param_groups(1e-3) for p in g["params"]}
    for name in ("fc1", "fc2"):
        z = getattr(model, name).adapters["default"].form.logits
        assert id(z) not in ids and id(z) not in ids_groups and not z.requires_grad


def test_meta_step_is_first_order_adam_on_the_validation_gradient():
    model, handle = build()
    perturb(handle)
    set_logits(model)
    handle.schedule.set_validation([val_batch()])
    # reference: ∇_z L_val by autograd on a copy, then Adam's first step z - lr·g/(|g| + eps)
    ref = copy.deepcopy(model)
    zs = [getattr(ref, n).adapters["default"].form.logits for n in ("fc1", "fc2")]
    for z in zs:
        z.requires_grad_(True)
    grads = torch.autograd.grad(ref(**val_batch()).loss, zs)
    expected = [z.detach() - LR * g / (g.abs() + 1e-8) for z, g in zip(zs, grads)]
    AB = {n: [t.detach().clone() for t in (getattr(model, n).adapters["default"].form.A,
                                           getattr(model, n).adapters["default"].form.B)] for n in ("fc1", "fc2")}
    handle.schedule.meta_step(handle)
    for name, z_ref in zip(("fc1", "fc2"), expected):
        f = getattr(model, name).adapters["default"].form
        torch.testing.assert_close(f.logits.detach(), z_ref, rtol=1e-9, atol=1e-12)
        assert not f.logits.requires_grad and f.A.grad is None and f.B.grad is None
        torch.testing.assert_close(f.A.detach(), AB[name][0], rtol=0, atol=0)  # the meta step moves z only
        torch.testing.assert_close(f.B.detach(), AB[name][1], rtol=0, atol=0)
    assert any((g.abs() > 0).any() for g in grads)


def test_search_then_threshold_on_schedule_and_rule_is_exact():
    model, handle = build(autolora_search_steps=0.5)
    handle.schedule.set_validation([val_batch()])
    z_before = {}
    orig = handle.schedule.threshold

    def spy(h, opt=None):
        for n in ("fc1", "fc2"):
            z_before[n] = getattr(model, n).adapters["default"].form.logits.detach().clone()
        return orig(h, opt)

    handle.schedule.threshold = spy
    train(model, handle, steps=10)
    assert handle.schedule.meta_steps == 5 and handle.schedule.thresholded
    for name in ("fc1", "fc2"):
        f = getattr(model, name).adapters["default"].form
        g = torch.softmax(z_before[name], 0)
        expected = (g >= 1 / R).to(f.rank_mask.dtype)
        torch.testing.assert_close(f.rank_mask, expected, rtol=0, atol=0)
        assert 1 <= expected.sum() <= R and float(f.autolora_search) == 0
    summary = handle.schedule.summary(handle)
    assert summary["total"] == sum(summary["ranks"].values()) and not summary["searching"]


def test_threshold_retrain_restarts_kept_ranks_from_lora_init():
    x, _ = tiny_data()
    model, handle = build()
    perturb(handle)
    set_logits(model)
    handle.schedule.threshold(handle)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)  # B = 0 again
    for name in ("fc1", "fc2"):
        A = getattr(model, name).adapters["default"].form.A
        assert A.abs().max() <= 1 / math.sqrt(A.shape[1])


def test_threshold_without_retrain_keeps_the_selected_part():
    x, _ = tiny_data()
    model, handle = build(autolora_retrain=False, autolora_threshold=0.3)
    perturb(handle)
    set_logits(model)
    gates = {}
    for name in ("fc1", "fc2"):
        g = torch.softmax(getattr(model, name).adapters["default"].form.logits.detach(), 0)
        keep = g >= 0.3
        keep[g.argmax()] = True  # at least the top rank
        gates[name] = g * keep
    ref = dense_model(model, gates)
    handle.schedule.threshold(handle)
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-10, atol=1e-12)
    assert all(getattr(model, n).adapters["default"].form.rank_mask.sum() >= 1 for n in ("fc1", "fc2"))


def test_save_load_after_threshold_and_no_more_search(tmp_path):
    x, y = tiny_data()
    model, handle = build()
    handle.schedule.set_validation([val_batch()])
    train(model, handle, steps=6)
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    for name in ("fc1", "fc2"):
        a, b = (getattr(m, name).adapters["default"].form for m in (model, fresh))
        torch.testing.assert_close(b.rank_mask, a.rank_mask, rtol=0, atol=0)
    z = fresh.fc1.adapters["default"].form.logits.detach().clone()
    train(fresh, loaded, steps=2)
    assert loaded.schedule.meta_steps == 0  # the saved mask says the search is over
    torch.testing.assert_close(fresh.fc1.adapters["default"].form.logits.detach(), z, rtol=0, atol=0)


def test_training_state_round_trip():
    model, handle = build()
    handle.schedule.set_validation([val_batch()])
    handle.plan(10)
    for step in (1, 2):
        handle.schedule.after_step(handle, None, step)
    state = handle.schedule.state_dict()
    other = build()[1].schedule
    other.load_state_dict(state)
    assert other.meta_steps == 2 and other.search_until == 5 and not other.thresholded
    for k, v in handle.schedule.moments.items():
        torch.testing.assert_close(other.moments[k][0], v[0], rtol=0, atol=0)
        torch.testing.assert_close(other.moments[k][1], v[1], rtol=0, atol=0)


@pytest.mark.parametrize("kw,match", [
    ({"form": "lora"}, "form='autolora'"),
    ({"autolora_lr": 0.0}, "autolora_lr"),
    ({"autolora_threshold": 1.5}, "autolora_threshold"),
    ({"autolora_retrain": "yes"}, "autolora_retrain"),
    ({"autolora_search_steps": 0}, "autolora_search_steps"),
    ({"autolora_search_steps": 2.5}, "autolora_search_steps"),
    ({"init": "pissa"}, "autolora"),
])
def test_bad_options_refused_before_model_changes(kw, match):
    model = TinyNet()
    spec_kw = {"form": "autolora", "schedule": "autolora", "rank": R, "targets": ["fc1", "fc2"], **kw}
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.adapt(model, lorazoo.AdapterSpec(**spec_kw))
    assert isinstance(model.fc1, nn.Linear)


def test_set_validation_refuses_non_batches():
    _, handle = build()
    with pytest.raises(lorazoo.LorazooError, match="set_validation"):
        handle.schedule.set_validation([])


@pytest.mark.parametrize("z,kept", [
    ([0.0, 0.0, 0.0, 0.0], [1, 1, 1, 1]),      # g = 1/r exactly: every rank passes g >= 1/r
    ([1.0, 0.0, 0.0, 0.0], [1, 0, 0, 0]),
    ([0.02, 0.01, 0.0, -0.03], [1, 1, 0, 0]),  # g = 0.2525, 0.2500.., 0.2475.., 0.2425..
])
def test_threshold_rule_on_hand_picked_logits(z, kept):
    z = torch.tensor(z, dtype=torch.float64)
    g = torch.exp(z) / torch.exp(z).sum()
    assert [int(v >= 1 / R) for v in g] == kept  # the hand-worked values above
    model, handle = build()
    with torch.no_grad():
        for f in (model.fc1, model.fc2):
            f.adapters["default"].form.logits.copy_(z)
    handle.schedule.threshold(handle)
    for f in (model.fc1, model.fc2):
        assert f.adapters["default"].form.rank_mask.tolist() == [float(k) for k in kept]
