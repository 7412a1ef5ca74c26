"""IncreLoRA (Zhang et al. 2023 [59]; study Eq. 45): ΔW = s·Σ λ_i p_i q_iᵀ over ranks that grow, every
interval, in the top-h layers by smoothed importance, up to the target budget; pre-allocated slots."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, assert_layer_update, perturb, tiny_data

OPTS = dict(schedule="increlora", increlora_init_rank=1, increlora_target_rank=3, increlora_rank_per_step=1,
            increlora_top_h=1, increlora_interval=2, increlora_warmup_steps=1, increlora_new_warmup=3)


def _form(layer):
    return layer.adapters["default"].form


def test_matches_dense_reference():
    model, handle = adapted("increlora", rank=4, alpha=6, **OPTS)
    perturb(handle)
    layer, form = model.fc2, _form(model.fc2)
    assert form.rank_mask.tolist() == [1, 0, 0, 0] and form.reserve_mask.tolist() == [0, 1, 0, 0]
    P, lam, Q = (t.detach() for t in (form.P, form.lam, form.Q))
    use = [1.0, 1.0, 0.0, 0.0]  # the active rank and the reserve rank (advance learning)
    delta = form.scale * sum(use[i] * lam[i] * torch.outer(P[:, i], Q[i]) for i in range(4))  # Eq. 45
    assert_layer_update(layer, form, delta)


def test_initial_ranks_reserve_and_near_zero_update():
    x, _ = tiny_data()
    model, handle = adapted("increlora", rank=4, **{**OPTS, "increlora_rank_per_step": 2})
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        assert f.rank_mask.tolist() == [1, 0, 0, 0] and f.reserve_mask.tolist() == [0, 1, 1, 0]
        assert torch.all(f.lam == 0)  # the reserve's λ = 1e-5 comes with the first step (the authors' code)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    _train(model, handle, 1)
    assert [float(v) for v in _form(model.fc1).lam[1:3]] == [1e-5, 1e-5]
    _, plain = adapted("increlora", rank=4, **{**OPTS, "increlora_advance": False})
    assert all(torch.all(ad.form.reserve_mask == 0) for ad in plain.adapters().values())


def _train(model, handle, steps, check=None, lr=2e-2, opt=None):
    x, y = tiny_data()
    opt = opt or torch.optim.AdamW(handle.param_groups(lr))
    model.train()
    for step in range(1, steps + 1):
        (model(x=x, labels=y).loss + handle.aux_loss()).backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        if check:
            check(step)
    model.eval()
    return opt


def test_growth_reaches_the_budget_exactly():
    model, handle = adapted("increlora", rank=4, **OPTS)
    forms = [_form(model.fc1), _form(model.fc2)]
    counts = []
    _train(model, handle, 14, lambda s: counts.append(sum(int(f.rank_mask.sum()) for f in forms)))
    # one rank to the top layer at steps 2, 4, 6, 8: from 1 + 1 to the target 3 x 2 layers
    assert counts == [2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6, 6, 6, 6]
    assert all(torch.all(f.reserve_mask == 0) for f in forms)  # reserve dropped once the budget is spent
    assert all(torch.all(f.lam[f.rank_mask == 0] == 0) for f in forms)
    summary = handle.schedule.summary(handle)
    assert summary["total"] == 6 and summary["capacity"] == 8
    assert summary["ranks"] == {"fc1": int(forms[0].rank_mask.sum()), "fc2": int(forms[1].rank_mask.sum())}


def test_last_growth_step_lands_on_the_target():
    # top 2 layers x 2 ranks would add 4, only 2 are left: the most important layer takes both
    model, handle = adapted("increlora", rank=4, **{**OPTS, "increlora_target_rank": 2, "increlora_top_h": 2,
                                                    "increlora_rank_per_step": 2})
    sched = handle.schedule
    _train(model, handle, 1)
    sched.ema = {"fc1": [1.0, 1.0], "fc2": [2.0, 1.0]}  # fc2 is the more important
    added = sched.grow(handle.adapters(), None)
    assert added == {"fc2": 2}
    assert [int(_form(l).rank_mask.sum()) for l in (model.fc1, model.fc2)] == [1, 3]


def test_growth_goes_to_the_most_important_layer_and_uses_the_trained_reserve():
    model, handle = adapted("increlora", rank=4, **OPTS)
    opt = _train(model, handle, 1)
    f1, f2 = _form(model.fc1), _form(model.fc2)
    trained_p = f2.P[:, 1].detach().clone()
    assert not torch.allclose(trained_p, f2.P[:, 1] * 0)  # the reserve trained p in advance
    handle.schedule.ema = {"fc1": [1.0, 1.0], "fc2": [3.0, 1.0]}
    assert handle.schedule.grow(handle.adapters(), opt) == {"fc2": 1}
    assert f2.rank_mask.tolist() == [1, 1, 0, 0] and f2.reserve_mask.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(f2.P[:, 1], trained_p)  # the reserve rank became active as it was
    assert f2.lam[2] == 1e-5 and f1.rank_mask.tolist() == [1, 0, 0, 0]
    for p, dim in ((f2.P, 1), (f2.Q, 0), (f2.lam, 0)):  # the new reserve slot starts with zero Adam state
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert torch.all(v.select(dim, 2) == 0)


def test_layer_importance_by_hand():
    model, handle = adapted("increlora", rank=4, **{**OPTS, "increlora_beta1": 0.6, "increlora_beta2": 0.7})
    perturb(handle)
    f = _form(model.fc1)
    x, y = tiny_data()
    i_bar = u_bar = 0.0
    for _ in range(2):
        model(x=x, labels=y).loss.backward()
        use = f.alive().bool()
        terms = torch.cat([(f.P * f.P.grad)[:, use].flatten(), (f.lam * f.lam.grad)[use],
                           (f.Q * f.Q.grad)[use].flatten()]).abs()
        raw = terms.mean().item()
        i_bar = 0.6 * i_bar + 0.4 * raw
        u_bar = 0.7 * u_bar + 0.3 * abs(raw - i_bar)
        handle.before_step(None)
        for p in handle.trainable_parameters():
            p.grad = None
    assert handle.schedule.score("fc1") == pytest.approx(i_bar * u_bar, rel=1e-9) and i_bar * u_bar > 0


def test_new_ranks_warm_up_and_reserve_lambda_is_held():
    model, handle = adapted("increlora", rank=4, **OPTS)
    x, y = tiny_data()
    opt = torch.optim.SGD(handle.param_groups(0.1))  # SGD: the step is lr·g, easy to check
    f = _form(model.fc1)
    handle.schedule.ema = {"fc1": [3.0, 1.0], "fc2": [1.0, 1.0]}
    handle.schedule.grow(handle.adapters(), opt)  # rank 1 becomes active, slot 2 the new reserve
    assert f.rank_mask.tolist() == [1, 1, 0, 0] and f.reserve_mask.tolist() == [0, 0, 1, 0]
    model.train()
    for step in (1, 2):
        model(x=x, labels=y).loss.backward()
        handle.before_step(opt)
        P0, lam0, g, lam_g = f.P.detach().clone(), f.lam.detach().clone(), f.P.grad.clone(), f.lam.grad.clone()
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        assert lam_g[2] == 0 and f.lam[2] == 1e-5  # reserve λ: no gradient, held at 1e-5
        assert torch.all(g[:, 3] == 0) and g[:, 2].abs().sum() > 0  # unused slot: no gradient
        # the initial rank at the full rate; the new ranks (age 0, then 1) at step/3 of it (warm-up of 3)
        torch.testing.assert_close(f.P[:, 0] - P0[:, 0], -0.1 * g[:, 0], rtol=1e-6, atol=0)
        torch.testing.assert_close(f.P[:, 2] - P0[:, 2], -0.1 * g[:, 2] * step / 3, rtol=1e-6, atol=0)
        torch.testing.assert_close(f.lam[1] - lam0[1], -0.1 * lam_g[1] * step / 3, rtol=1e-6, atol=0)


def test_grown_ranks_survive_save_and_load(tmp_path):
    model, handle = adapted("increlora", rank=4, **OPTS)
    _train(model, handle, 5)
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    for name in ("fc1", "fc2"):
        a, b = _form(getattr(fresh, name)), _form(getattr(model, name))
        torch.testing.assert_close(a.rank_mask, b.rank_mask)
        torch.testing.assert_close(a.reserve_mask, b.reserve_mask)
    assert sum(int(_form(getattr(fresh, n)).rank_mask.sum()) for n in ("fc1", "fc2")) == 4
    x, _ = tiny_data()
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_schedule_state_roundtrip():
    model, handle = adapted("increlora", rank=4, **OPTS)
    _train(model, handle, 3)
    state = handle.schedule.state_dict()
    _, other = adapted("increlora", rank=4, **OPTS)
    other.schedule.load_state_dict(state)
    assert other.schedule.ema == handle.schedule.ema and other.schedule.step == 3
    assert all(torch.equal(other.schedule.ages[k], handle.schedule.ages[k]) for k in handle.schedule.ages)


def test_orthogonality_covers_the_ranks_in_use():
    model, handle = adapted("increlora", rank=4, **{**OPTS, "increlora_orth_reg": 0.5})
    perturb(handle)
    total = 0.0
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        P, Q = f.P.detach(), f.Q.detach()
        for i in (0, 1):  # the active rank and the reserve
            for j in (0, 1):
                d = float(i == j)
                total += (P[:, i] @ P[:, j] - d) ** 2 + (Q[i] @ Q[j] - d) ** 2
    torch.testing.assert_close(handle.aux_loss(), torch.as_tensor(0.5 * total, dtype=torch.float64),
                               rtol=1e-9, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(form="adalora"), "form='increlora'"),
    (dict(schedule="adalora"), "schedule 'increlora'"),
    (dict(increlora_target_rank=5), "increlora_target_rank"),
    (dict(increlora_init_rank=3, increlora_target_rank=2), "increlora_init_rank"),
    (dict(increlora_init_rank=0), "increlora_init_rank"),
    (dict(increlora_rank_per_step=5), "increlora_rank_per_step"),
    (dict(increlora_interval=0), "increlora_interval"),
    (dict(increlora_top_h=1.5), "increlora_top_h"),
    (dict(increlora_beta1=1.0), "increlora_beta1"),
    (dict(increlora_advance="yes"), "increlora_advance"),
    (dict(increlora_orth_reg=-1), "increlora_orth_reg"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(**{"form": "increlora", "schedule": "increlora", "rank": 4, **bad})


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    from test_checkpoint import allocation_survives_a_kill

    def make():
        model = TinyNet(dtype=torch.float32)
        spec = lorazoo.AdapterSpec.preset("increlora", rank=4, targets=["fc1", "fc2"],
                                          **{k: v for k, v in OPTS.items() if k != "schedule"})
        return model, lorazoo.adapt(model, spec)

    handle, handle2, ref = allocation_survives_a_kill(tmp_path, make)
    fresh = make()[1].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in ref.items() if k.endswith("rank_mask"))  # it moved
