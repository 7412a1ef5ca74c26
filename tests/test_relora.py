"""ReLoRA ([21]; study Eq. 12-13): every T steps W0 += s·B·A, factors re-initialized, optimizer
state pruned by magnitude, jagged cosine learning rate with re-warmups."""
import math

import pytest
import torch

import lorazoo
from lorazoo.parts import Form
from lorazoo.schedules.relora import ReLoRA
from tiny import TinyNet, adapted, perturb, tiny_data, train

NAMES = ("fc1", "fc2")


def _relora(**kw):
    return adapted(schedule="relora", **{"relora_restart_warmup": 1, **kw})


def _forms(model):
    return [getattr(model, n).adapters["default"].form for n in NAMES]


def _adam_with_state(handle, model):
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    for _ in range(2):
        model(x=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_merge_step_is_exact_and_reinitializes():
    x, _ = tiny_data()
    model, handle = _relora(relora_interval=3)
    perturb(handle)
    out = model(x=x).logits.detach()
    W = [getattr(model, n).base.weight.detach().clone() for n in NAMES]
    old = [(f.B.detach().clone(), f.A.detach().clone(), f.scale) for f in _forms(model)]
    handle.after_step(None, 2)  # not a multiple of the interval: nothing happens
    assert all(torch.equal(getattr(model, n).base.weight, w) for n, w in zip(NAMES, W))
    handle.after_step(None, 3)
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-6, atol=1e-10)
    for n, w, (B, A, s), f in zip(NAMES, W, old, _forms(model)):
        torch.testing.assert_close(getattr(model, n).base.weight.detach(), w + s * B @ A, rtol=1e-6, atol=1e-12)  # Eq. 12
        assert (f.B == 0).all()                       # a fresh zero update ...
        assert not torch.allclose(f.A, A)             # ... along a new random A
        bound = 1 / math.sqrt(f.in_features)          # LoRA's Kaiming-uniform init of A
        assert f.A.abs().max() <= bound and f.A.abs().max() > 0.5 * bound
        ad = getattr(model, n).adapters["default"]
        assert ad.shift_A.shape == (4, f.in_features)  # the merge is recorded


@pytest.mark.parametrize("prune", [0.0, 0.75, 0.99])
def test_optimizer_state_is_pruned_by_magnitude(prune):
    model, handle = _relora(relora_interval=5, relora_prune=prune, modules_to_save=["head"])
    opt = _adam_with_state(handle, model)
    params = [p for f in _forms(model) for p in (f.B, f.A)]
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    head = {k: v.clone() for k, v in opt.state[model.head.weight].items()}
    handle.after_step(opt, 5)
    for p in params:
        second = before[id(p)]["exp_avg_sq"].flatten()
        keep = second.numel() - round(prune * second.numel())
        top = second.argsort(descending=True)[:keep]  # the largest second moments survive, in both moments
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[id(p)][key].flatten(), opt.state[p][key].flatten()
            ref = torch.zeros_like(old)
            ref[top] = old[top]
            torch.testing.assert_close(new, ref, rtol=0, atol=0)
        assert opt.state[p]["step"] == before[id(p)]["step"]
    for k, v in head.items():  # state of parameters that are not re-initialized is kept
        torch.testing.assert_close(opt.state[model.head.weight][k], v, rtol=0, atol=0)


def test_full_reset_drops_the_state():
    model, handle = _relora(relora_interval=5, relora_prune=1.0)
    opt = _adam_with_state(handle, model)
    handle.after_step(opt, 5)
    assert all(p not in opt.state for f in _forms(model) for p in (f.B, f.A))
    assert len(opt.state) == 0


def _reference_lr(t, T, W0, Wr, N, rho):
    def cosine(u):
        if N == 0:
            return 1.0
        progress = min(1.0, max(0.0, (u - W0) / (N - W0)))
        return rho + (1 - rho) * 0.5 * (1 + math.cos(math.pi * progress))
    if t <= W0:
        return t / W0
    k = (t - 1) // T
    if k >= 1 and t - k * T <= Wr:
        return (t - k * T) / Wr * cosine(k * T + Wr)
    return cosine(t)


@pytest.mark.parametrize("N", [60, 0])
def test_jagged_cosine_learning_rate(N):
    opts = dict(relora_interval=10, relora_warmup=4, relora_restart_warmup=3, relora_total_steps=N,
                relora_min_lr_ratio=0.1)
    model, handle = adapted(schedule="relora", **opts)
    curve = [handle.lr_factor(t) for t in range(1, 71)]
    ref = [_reference_lr(t, 10, 4, 3, N, 0.1) for t in range(1, 71)]
    assert curve == pytest.approx(ref, rel=1e-12)
    assert curve[3] == 1.0 and curve[0] == 0.25                # first warmup 1/4 .. 4/4
    for k in (1, 2, 3):                                         # jagged: a drop after every reset
        assert curve[10 * k] < 0.5 * curve[10 * k - 1]
    if N:
        assert curve[-1] == pytest.approx(0.1) and max(curve) == 1.0  # decays to rho at N


def test_default_schedule_is_flat_without_warmups():
    model, handle = adapted(schedule="relora", relora_restart_warmup=0)
    handle.plan(200)
    assert [handle.lr_factor(t) for t in range(1, 200)] == [1.0] * 199


def test_default_interval_is_a_quarter_of_the_planned_run():
    model, handle = adapted(schedule="relora")
    with pytest.raises(lorazoo.LorazooError, match="handle.plan"):
        handle.lr_factor(1)
    handle.plan(200)  # T = 50 steps, re-warm for a tenth of it (5 steps) after each merge
    assert [handle.lr_factor(t) for t in (50, 51, 55, 56)] == [1.0, 0.2, 1.0, 1.0]
    model, handle = adapted(schedule="relora", relora_restart_warmup=10)
    with pytest.raises(lorazoo.SpecError, match="relora_restart_warmup"):
        handle.plan(40)  # T = 10 leaves no step after a 10-step re-warmup


def test_training_with_merges_learns_and_save_load_reproduces(tmp_path):
    x, _ = tiny_data()
    torch.manual_seed(0)  # the re-inits draw from the global generator
    model, handle = _relora(relora_interval=5, relora_restart_warmup=3)
    losses = train(model, handle, steps=16, lr=1e-2)  # 3 merges
    assert losses[-1] < 0.6 * losses[0] and max(losses) == losses[0]
    assert model.fc1.adapters["default"].shift_A.shape[0] == 3 * 4
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-6, atol=1e-10)
    loaded.delete()  # the shifts are undone
    torch.testing.assert_close(fresh(x=x).logits, TinyNet()(x=x).logits, rtol=1e-6, atol=1e-10)


def test_merge_refused_before_any_change_when_update_is_not_sBA():
    model, handle = _relora(relora_interval=2)
    perturb(handle)
    W = {n: getattr(model, n).base.weight.detach().clone() for n in NAMES}
    form = model.fc2.adapters["default"].form
    form.delta_weight = lambda w: 2 * form.scale * form.B @ form.A  # e.g. a form with a hidden mixer
    with pytest.raises(lorazoo.LorazooError, match="not s·B·A"):
        handle.after_step(None, 2)
    assert all(torch.equal(getattr(model, n).base.weight, W[n]) for n in NAMES)
    assert all(getattr(model, n).adapters["default"].shift_A.shape[0] == 0 for n in NAMES)


def test_merged_adapter_is_refused():
    model, handle = _relora(relora_interval=2)
    handle.merge()
    with pytest.raises(lorazoo.LorazooError, match="unmerge"):
        handle.after_step(None, 2)


class _NoFactors(Form):
    pass


class _ReadsOutput(Form):
    reads_output = True

    def factors(self):
        return None


class _NotZero(_ReadsOutput):
    reads_output, zero_init = False, False


def test_forms_that_cannot_merge_and_restart_are_refused():
    for cls in (_NoFactors, _ReadsOutput, _NotZero):
        with pytest.raises(lorazoo.SpecError, match="relora"):
            ReLoRA.check_form(cls)


@pytest.mark.parametrize("bad", [{"relora_interval": 0}, {"relora_interval": 2.5}, {"relora_prune": 1.5},
                                 {"relora_restart_warmup": 10, "relora_interval": 10}, {"relora_interval": -0.5}, {"relora_restart_warmup": 1.5},
                                 {"relora_total_steps": 5, "relora_warmup": 5}, {"relora_min_lr_ratio": 2}])
def test_bad_options_are_refused(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(schedule="relora", **bad)
