"""AdaLoRA (Zhang et al. 2023 [22]; study Eq. 35-45): ΔW = s·P·diag(λ)·Q, λ = 0 at init, importance
masking of triplets to a cubic budget b(t), orthogonality regularizer."""
import pytest
import torch
from torch import nn

import lorazoo
from tiny import TinyNet, adapted, layer_input, perturb, tiny_data

OPTS = dict(adalora_total_steps=20, adalora_warmup_steps=2, adalora_final_steps=4, adalora_interval=2,
            adalora_target_rank=1)


def _eq39(t, b0, bT, ti, tf, T):
    """Study Eq. 38-39, written out; the budget is a whole number of triplets (floor)."""
    if 0 <= t < ti:
        return b0
    if ti <= t < T - tf:
        return int(bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3)
    return bT


def _form(layer):
    return layer.adapters["default"].form


def test_matches_dense_reference():
    model, handle = adapted("adalora", rank=4, alpha=6)
    perturb(handle)
    layer = model.fc2
    form = _form(layer)
    form.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))  # one triplet pruned
    P, lam, Q, m = (t.detach() for t in (form.P, form.lam, form.Q, form.rank_mask))
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    delta = sum(lam[i] * m[i] * torch.outer(P[:, i], Q[i]) for i in range(4))  # Eq. 45: Σ λ_i p_i q_iᵀ
    x = layer_input()
    ref = x @ (W0 + (6 / 4) * delta).T + b
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(form.delta_weight(W0), (6 / 4) * delta, rtol=1e-6, atol=0)


def test_rank_dropout_mask_acts_on_the_triplets():
    model, handle = adapted("adalora", rank=4)
    perturb(handle)
    form = _form(model.fc2)
    x, y = layer_input(), torch.zeros(5, 16, dtype=torch.float64)
    drop = torch.tensor([2.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    P, lam, Q = (t.detach() for t in (form.P, form.lam, form.Q))
    ref = x @ (form.scale * sum(drop[i] * lam[i] * torch.outer(P[:, i], Q[i]) for i in range(4))).T
    torch.testing.assert_close(form(x, y, None, drop), ref, rtol=1e-6, atol=0)


def test_zero_update_at_init_and_random_singular_vectors():
    x, _ = tiny_data()
    model, handle = adapted("adalora", rank=4)
    for layer in (model.fc1, model.fc2):
        form = _form(layer)
        assert torch.count_nonzero(form.lam) == 0
        assert form.P.std() > 0.005 and form.Q.std() > 0.005  # N(0, 0.02²), not zero
        assert torch.all(form.rank_mask == 1)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


def test_rank_of_update_is_at_most_the_kept_triplets():
    model, handle = adapted("adalora", rank=4)
    perturb(handle)
    form = _form(model.fc2)
    form.rank_mask.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.linalg.matrix_rank(form.delta_weight(model.fc2.linear_weight())) == 2


def test_budget_function_is_the_cubic_schedule():
    from lorazoo.schedules.adalora import budget

    b0, bT, ti, tf, T = 24, 6, 10, 20, 100
    for t in [0, 5, 9, 10, 11, 25, 40, 55, 70, 79, 80, 81, 100, 150]:
        assert budget(t, b0, bT, ti, tf, T) == _eq39(t, b0, bT, ti, tf, T), t
    # by hand: t=45 is half-way through the decay, (1 - 35/70)^3 = 1/8, 6 + 18/8 = 8.25 -> 8
    assert budget(45, b0, bT, ti, tf, T) == 8
    assert budget(ti, b0, bT, ti, tf, T) == b0 and budget(T - tf, b0, bT, ti, tf, T) == bT


def _train(handle, model, steps, check=None, call_before_step=True):
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(2e-2))
    model.train()
    for step in range(1, steps + 1):
        loss = model(x=x, labels=y).loss + handle.aux_loss()
        loss.backward()
        if call_before_step:
            handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        if check:
            check(step)


def test_unmasked_count_equals_budget_after_every_masking_step():
    model, handle = adapted("adalora", rank=4, schedule="adalora", **OPTS)
    forms = [_form(model.fc1), _form(model.fc2)]
    b0, bT = 4 * 2, 1 * 2  # init rank (= rank) x layers, target rank x layers
    seen = [b0]

    def check(step):
        kept = sum(int(f.rank_mask.sum()) for f in forms)
        if (step % 2 == 0 and step < 16) or step == 16:  # masking steps: every interval, and T - t_f
            assert kept == _eq39(step, b0, bT, 2, 4, 20), step
        else:
            assert kept == seen[-1], step  # the pattern holds between masking steps
        assert sum(int(torch.count_nonzero(f.lam)) for f in forms) <= kept
        assert all(torch.all(f.lam[f.rank_mask == 0] == 0) for f in forms)  # Eq. 37: λ_i <- 0
        seen.append(kept)

    _train(handle, model, 20, check)
    assert seen[-1] == bT and sorted(seen, reverse=True) == seen and len(set(seen)) > 3
    # from T - t_f on the pattern is fixed and pruned triplets stay out of the forward
    x, _ = tiny_data()
    out = model(x).logits
    for f in forms:
        f.lam.data[f.rank_mask == 0] = 5.0
    torch.testing.assert_close(model(x).logits, out)


def test_masking_is_global_across_layers():
    model, handle = adapted("adalora", rank=4, schedule="adalora", **OPTS)
    _train(handle, model, 1)
    sched = handle.schedule
    for (path, name), (i_bar, u_bar) in sched.ema.items():  # every triplet of fc1 beats every one of fc2
        i_bar.fill_(1.0)
        u_bar.fill_(10.0 if path == "fc1" else 1.0)
    sched.after_step(handle, None, 16)  # T - t_f: keep bT = 2 triplets of 8
    assert int(_form(model.fc1).rank_mask.sum()) == 2 and int(_form(model.fc2).rank_mask.sum()) == 0


def test_triplet_importance_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2)).double()
    b1, b2 = 0.7, 0.6
    handle = lorazoo.adapt(net, lorazoo.AdapterSpec(
        form="adalora", schedule="adalora", rank=2, targets=["0"], adalora_beta1=b1, adalora_beta2=b2, adalora_total_steps=100))
    perturb(handle)
    form = net[0].adapters["default"].form
    params = {"P": form.P, "lam": form.lam, "Q": form.Q}
    history = []
    for seed in (1, 2):  # two steps, so both EMAs carry state
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        net(x).pow(2).sum().backward()
        history.append({k: (p.detach().clone(), p.grad.clone()) for k, p in params.items()})
        handle.before_step(None)
        for p in params.values():
            p.grad = None
        with torch.no_grad():
            form.P.mul_(1.1)  # parameters move between steps

    def s(name, idx):  # Eq. 40-43 for one scalar, by hand
        i_bar = u_bar = 0.0
        for step in history:
            theta, grad = step[name][0][idx].item(), step[name][1][idx].item()
            sens = abs(theta * grad)
            i_bar = b1 * i_bar + (1 - b1) * sens
            u_bar = b2 * u_bar + (1 - b2) * abs(sens - i_bar)
        return i_bar * u_bar

    expected = torch.tensor([  # Eq. 44: s(λ_i) + mean over the rows of P_i + mean over the columns of Q_i
        s("lam", (i,)) + sum(s("P", (j, i)) for j in range(2)) / 2 + sum(s("Q", (i, j)) for j in range(3)) / 3
        for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(handle.schedule.triplet_importance("0"), expected, rtol=1e-6, atol=0)
    assert torch.all(expected > 0)


def test_orthogonality_regularizer_equals_dense_formula():
    model, handle = adapted("adalora", rank=4, schedule="adalora", adalora_orth_reg=0.3)
    perturb(handle)
    norms = []
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        P, Q = f.P.detach(), f.Q.detach()
        p = q = 0.0
        for i in range(4):
            for j in range(4):
                delta = float(i == j)
                p += (P[:, i] @ P[:, j] - delta) ** 2  # Eq. 35, term by term
                q += (Q[i] @ Q[j] - delta) ** 2
        torch.testing.assert_close(f.orthogonality(), p + q, rtol=1e-10, atol=0)
        norms += [p ** 0.5, q ** 0.5]
    aux = handle.aux_loss()  # the authors' code and PEFT: mean of the unsquared norms over the matrices
    torch.testing.assert_close(aux, 0.3 * sum(norms) / len(norms), rtol=1e-6, atol=0)
    aux.backward()
    assert _form(model.fc1).P.grad.abs().sum() > 0 and _form(model.fc2).Q.grad.abs().sum() > 0


def test_plain_svd_form_without_the_schedule():
    model, handle = adapted("adalora", rank=4)
    assert handle.aux_loss().item() == 0
    _train(handle, model, 20)
    assert all(torch.all(_form(l).rank_mask == 1) for l in (model.fc1, model.fc2))


def test_masking_without_before_step_is_refused():
    model, handle = adapted("adalora", rank=4, schedule="adalora", **OPTS)
    with pytest.raises(lorazoo.LorazooError, match="before_step"):
        _train(handle, model, 4, call_before_step=False)


def test_rank_mask_is_saved(tmp_path):
    model, handle = adapted("adalora", rank=4, schedule="adalora", **OPTS)
    _train(handle, model, 17)
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(_form(getattr(fresh, name)).rank_mask, _form(getattr(model, name)).rank_mask)
    x, _ = tiny_data()
    model.eval()
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


@pytest.mark.parametrize("bad, match", [
    (dict(form="lora"), "form='adalora'"),
    (dict(adalora_init_rank=5), "adalora_init_rank"),
    (dict(adalora_target_rank=5), "adalora_target_rank"),
    (dict(adalora_init_rank=2, adalora_target_rank=3), "adalora_target_rank"),
    (dict(adalora_beta1=1.0), "adalora_beta1"),
    (dict(adalora_beta2=0), "adalora_beta2"),
    (dict(adalora_total_steps=150, adalora_warmup_steps=100, adalora_final_steps=50), "adalora_warmup_steps"),
    (dict(adalora_warmup_steps=1.5), "adalora_warmup_steps"),
    (dict(adalora_total_steps=0), "adalora_total_steps"),
    (dict(adalora_interval=0), "adalora_interval"),
    (dict(adalora_orth_reg=-1), "adalora_orth_reg"),
    (dict(adalora_target_rank=1.5), "adalora_target_rank"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(**{"form": "adalora", "schedule": "adalora", "rank": 4, **bad})


def test_initial_budget_below_the_rank():
    model, handle = adapted("adalora", rank=4, schedule="adalora", **{**OPTS, "adalora_init_rank": 2})
    forms = [_form(model.fc1), _form(model.fc2)]
    kept = []
    _train(handle, model, 2, lambda step: kept.append(sum(int(f.rank_mask.sum()) for f in forms)))
    assert kept == [4 * 2, 2 * 2]  # every triplet until the first masking step (t=2), then b0 = 2 x 2 layers


def test_the_run_length_comes_from_plan_and_fractions_scale_with_it():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("adalora", rank=6, targets=["fc1", "fc2"]))
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    model(x=x, labels=y).loss.backward()
    with pytest.raises(lorazoo.LorazooError, match="handle.plan"):
        handle.before_step(opt)  # nothing has stepped yet
    handle.plan(50)
    sched = handle.schedule
    assert (sched.total, sched.t_init, sched.t_final) == (50, 5, 15)  # defaults: 10 % warm-up, 30 % final
    from lorazoo.schedules.adalora import resolve_steps

    with pytest.raises(lorazoo.SpecError, match="train longer"):
        resolve_steps({"adalora_total_steps": None, "adalora_warmup_steps": 5, "adalora_final_steps": 5}, 8)
    with pytest.raises(lorazoo.LorazooError, match="total_steps"):
        handle.plan(0)


def test_preset_scale_is_the_authors_alpha_over_r_plus_1e5():
    spec = lorazoo.AdapterSpec.preset("adalora", rank=6, alpha=12, targets=["fc1", "fc2"])
    handle = lorazoo.adapt(TinyNet(), spec)
    form = next(iter(handle.adapters().values())).form
    assert form.scale == pytest.approx(12 / (6 + 1e-5), rel=1e-12)
    assert form.scale != pytest.approx(12 / 6, rel=1e-7)  # not plain alpha / r
