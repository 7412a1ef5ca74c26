"""The Trainer on tiny models: schedule shapes, accumulation, hook order, epochs, errors."""
import math

import pytest
import torch

import lorazoo
from lorazoo.errors import LorazooError
from lorazoo.train import Trainer, schedule_factor
from tiny import TinyNet, adapted, perturb, tiny_data


def batches(n=64, size=16, seed=1):
    x, y = tiny_data(n, seed=seed)
    return [{"x": x[i:i + size], "labels": y[i:i + size]} for i in range(0, n, size)]


# --- schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_warmup_then_decay(kind):
    total, warm = 100, 10
    f = [schedule_factor(s, total, warm, kind) for s in range(1, total + 1)]
    assert f[0] == pytest.approx(0.1) and f[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warm - 1], f[1:warm]))         # warmup rises
    assert f[warm] == pytest.approx(1.0)                                # first decay step at peak
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))          # then decays
    assert 0 < f[-1] < 0.05 and max(f) == pytest.approx(1.0)


def test_schedule_linear_is_linear_and_cosine_is_half_cosine():
    lin = [schedule_factor(s, 21, 0, "linear") for s in range(1, 22)]
    assert lin[0] == 1.0 and lin[10] == pytest.approx(1 - 10 / 21)
    diffs = {round(a - b, 9) for a, b in zip(lin, lin[1:])}
    assert len(diffs) == 1
    cos = [schedule_factor(s, 21, 0, "cosine") for s in range(1, 22)]
    assert cos[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 21)))
    assert all(schedule_factor(s, 50, 5, "constant") == 1.0 for s in range(5, 51))


def test_trainer_applies_schedule_times_handle_factor(monkeypatch):
    model, handle = adapted()
    monkeypatch.setattr(handle, "lr_factor", lambda step: 0.5 if step % 2 else 1.0)
    tr = Trainer(model, handle, lr=0.1, epochs=5, warmup=2, lr_schedule="cosine", progress=False)
    tr.fit(batches())
    total = 5 * 4
    expect = [0.1 * schedule_factor(s, total, 2, "cosine") * (0.5 if s % 2 else 1.0) for s in range(1, total + 1)]
    assert tr.lrs == pytest.approx(expect)


def test_param_group_base_rates_are_kept():
    model, handle = adapted()
    handle.param_groups = lambda lr, wd: [  # LoRA+-like: B at 4x
        {"params": [p for n, p in handle.named_trainable_parameters() if "B" in n.split(".")[-1]],
         "lr": 4 * lr, "weight_decay": wd},
        {"params": [p for n, p in handle.named_trainable_parameters() if "B" not in n.split(".")[-1]],
         "lr": lr, "weight_decay": wd}]
    tr = Trainer(model, handle, lr=0.01, warmup=0, lr_schedule="constant", progress=False)
    tr.fit(batches())
    assert [g["lr"] for g in tr.optimizer.param_groups] == pytest.approx([0.04, 0.01])


# --- accumulation ----------------------------------------------------------------------------
def _trained(accumulation, micro):
    model, handle = adapted()
    tr = Trainer(model, handle, lr=0.05, epochs=1, accumulation=accumulation, warmup=0,
                 lr_schedule="constant", max_grad_norm=None, progress=False)
    tr.fit(micro)
    return {k: v.detach().clone() for k, v in handle.state_dict().items()}, tr


def test_accumulation_equals_one_big_batch():
    x, y = tiny_data(48)
    big = [{"x": x, "labels": y}]
    # uneven micro-batches: 20 + 20 + 8 examples, weighted by their share
    micro = [{"x": x[a:b], "labels": y[a:b]} for a, b in ((0, 20), (20, 40), (40, 48))]
    s1, t1 = _trained(1, big * 3)  # 3 steps of the big batch ...
    s2, t2 = _trained(3, micro * 3)  # ... equal 3 steps of 3 accumulated micro-batches
    assert t1.step == t2.step == 3
    assert t1.losses == pytest.approx(t2.losses, rel=1e-10)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-9, atol=1e-12)


def test_accumulation_counts_steps():
    model, handle = adapted()
    tr = Trainer(model, handle, lr=0.01, epochs=2, accumulation=3, progress=False)
    out = tr.fit(batches(n=112))  # 7 batches an epoch -> 3 steps (3+3+1) an epoch
    assert out["steps"] == 6 == len(out["losses"]) == tr.total_steps(7)


# --- hooks and epochs ------------------------------------------------------------------------
def test_hooks_called_in_order(monkeypatch):
    model, handle = adapted()
    calls = []
    orig_aux = handle.aux_loss
    monkeypatch.setattr(handle, "aux_loss", lambda: calls.append("aux") or orig_aux())
    monkeypatch.setattr(handle, "before_step", lambda opt: calls.append("before"))
    monkeypatch.setattr(handle, "after_step", lambda opt, step: calls.append(("after", step)))
    monkeypatch.setattr(handle, "lr_factor", lambda step: calls.append(("lr", step)) or 1.0)
    tr = Trainer(model, handle, lr=0.01, epochs=1, accumulation=2, progress=False)
    step_fn = tr.optimizer.step
    monkeypatch.setattr(tr.optimizer, "step", lambda *a, **k: calls.append("step") or step_fn(*a, **k))
    tr.fit(batches())  # 4 micro-batches -> 2 steps
    one = lambda s: [("lr", s), "aux", "aux", "before", "step", ("after", s)]  # noqa: E731
    assert calls == one(1) + one(2)


def test_aux_loss_is_added_once_per_step():
    model, handle = adapted()
    perturb(handle)  # so that the task gradient is not zero
    w = handle.trainable_parameters()[0]
    handle.aux_loss = lambda: 100.0 * (w ** 2).sum()
    tr = Trainer(model, handle, lr=1e-3, accumulation=4, warmup=0, progress=False, max_grad_norm=None)
    grads = []
    handle.before_step = lambda opt: grads.append(w.grad.clone())
    x, y = tiny_data(64)
    with torch.no_grad():
        expect = 200.0 * w
    tr.fit(batches())
    task_grad = grads[0] - expect  # what remains is the task gradient, not 4x the aux gradient
    model2, handle2 = adapted()
    perturb(handle2)
    loss = model2(x=x, labels=y).loss
    loss.backward()
    assert handle2.trainable_parameters()[0].grad.abs().sum() > 0
    torch.testing.assert_close(task_grad, handle2.trainable_parameters()[0].grad)


def test_epochs_evaluate_and_reshuffle():
    model, handle = adapted()
    seen, evals = [], []

    def per_epoch(epoch):
        seen.append(epoch)
        return batches(seed=epoch + 1)

    tr = Trainer(model, handle, lr=0.02, epochs=2.5, progress=False,
                 evaluate=lambda m: evals.append(m.training) or {"acc": 0.5})
    out = tr.fit(per_epoch)
    assert seen == [0, 1, 2] and evals == [False, False, False]
    assert [m["epoch"] for m in out["metrics_per_epoch"]] == [1, 2, 2.5]
    assert out["steps"] == 4 + 4 + 2 and not model.training


def test_training_lowers_loss_and_trains_only_the_adapter():
    model, handle = adapted()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tr = Trainer(model, handle, lr=0.03, epochs=10, progress=False)
    out = tr.fit(batches())
    assert out["losses"][-1] < 0.8 * out["losses"][0]
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_fit_reports_what_the_first_step_keeps_for_backward():
    from lorazoo.memory import saved_for_backward_mb

    kept = {}
    for form in ("lora", "dora"):
        model, handle = adapted(form)
        data = batches()
        twin, _ = adapted(form)
        by_hand = saved_for_backward_mb(twin, lambda: twin(**data[0]).loss.backward())
        kept[form] = Trainer(model, handle, lr=0.01, progress=False).fit(data)["saved_mb"]
        assert kept[form] == pytest.approx(by_hand) and by_hand > 0
    assert kept["dora"] > kept["lora"]  # DoRA also keeps the column norms' inputs


def test_progress_bar_can_be_off(capsys):
    model, handle = adapted()
    Trainer(model, handle, lr=0.01, progress=False).fit(batches())
    assert capsys.readouterr().err == ""


def test_relora_like_schedule_hooks_run_through_trainer():
    model = TinyNet()
    spec = lorazoo.AdapterSpec(rank=4, targets=["fc1", "fc2"])
    handle = lorazoo.adapt(model, spec)
    steps = []
    handle.after_step = lambda opt, step: steps.append(step)
    Trainer(model, handle, lr=0.01, epochs=3, progress=False).fit(batches())
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("kw, msg", [
    ({"lr": 0}, "lr"), ({"lr": 1e-3, "epochs": 0}, "epochs"), ({"lr": 1e-3, "accumulation": 0}, "accumulation"),
    ({"lr": 1e-3, "lr_schedule": "step"}, "lr schedule"), ({"lr": 1e-3, "warmup": -1}, "warmup"),
])
def test_bad_options_raise(kw, msg):
    model, handle = adapted()
    with pytest.raises(LorazooError, match=msg):
        Trainer(model, handle, **kw)


def test_nan_loss_raises():
    model, handle = adapted()
    x, y = tiny_data(16)
    with pytest.raises(LorazooError, match="lower the learning rate"):
        Trainer(model, handle, lr=0.01, progress=False).fit([{"x": x * float("nan"), "labels": y}])
