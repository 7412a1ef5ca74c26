"""SaLoRA (Hu et al. 2023 [56]; study Eq. 46-49): hard-concrete L0 gates on the ranks of a LoRA update,
expected-L0 budget by Lagrangian relaxation, exact budget fixed at T − t_f."""
import math

import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, assert_layer_update, layer_input, perturb, tiny_data

TAU, GAMMA, ZETA = 2 / 3, -0.1, 1.1
OPTS = dict(schedule="salora", salora_total_steps=20, salora_final_steps=6, salora_target_rank=2)


def _form(layer):
    return layer.adapters["default"].form


def _sig(v):
    return 1 / (1 + math.exp(-v))


def _gate(log_alpha, u=None):
    """Study Eq. 46-47 for one scalar (u None: the deterministic test-time gate)."""
    s = _sig(log_alpha) if u is None else _sig((math.log(u / (1 - u)) + log_alpha) / TAU)
    return min(1.0, max(0.0, s * (ZETA - GAMMA) + GAMMA))


def _delta(form, gates):
    A, B = form.A.detach(), form.B.detach()
    return form.scale * sum(gates[i] * torch.outer(B[:, i], A[i]) for i in range(form.rank))


def test_eval_output_and_delta_match_dense_reference():
    model, handle = adapted("salora", rank=4, alpha=6)
    perturb(handle, scale=1.0)
    layer, form = model.fc2, _form(model.fc2)
    form.rank_mask.copy_(torch.tensor([1.0, 1.0, 0.0, 1.0]))
    model.eval()
    la = form.log_alpha.detach()
    gates = [_gate(la[i].item()) * form.rank_mask[i].item() for i in range(4)]
    delta = _delta(form, gates)
    assert (6 / 4) == form.scale
    assert_layer_update(layer, form, delta)


def test_training_forward_draws_the_hard_concrete_gate():
    model, handle = adapted("salora", rank=4)
    perturb(handle, scale=2.0)  # log α spread over both sides of the clamp
    layer, form = model.fc2, _form(model.fc2)
    model.train()
    x = layer_input()
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    u = torch.rand(4, dtype=torch.float64)
    la = form.log_alpha.detach()
    gates = [_gate(la[i].item(), u[i].item()) for i in range(4)]
    assert len(set(gates)) > 1  # the draw differs per rank
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    torch.testing.assert_close(out, x @ (W0 + _delta(form, gates)).T + b, rtol=1e-9, atol=1e-12)


def test_gate_values_cover_the_clamped_range():
    from lorazoo.forms.salora import hard_concrete

    la = torch.tensor([-6.0, 0.0, 6.0], dtype=torch.float64)
    u = torch.full((3,), 0.5, dtype=torch.float64)
    z = hard_concrete(la, u, TAU, GAMMA, ZETA)
    assert z[0] == 0 and 0 < z[1] < 1 and z[2] == 1  # exact zeros and ones: an L0 gate
    assert z[1].item() == pytest.approx(_gate(0.0, 0.5), rel=1e-12)


def test_expected_l0_is_the_hard_concrete_formula_with_a_gradient():
    model, handle = adapted("salora", rank=4)
    perturb(handle, scale=2.0)
    form = _form(model.fc1)
    form.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    la = form.log_alpha.detach()
    expected = sum(_sig(la[i].item() - TAU * math.log(-GAMMA / ZETA)) for i in (0, 2, 3))  # Eq. 48
    l0 = form.expected_l0()
    assert l0.item() == pytest.approx(expected, rel=1e-12)
    assert 0 < l0.item() < 3 and l0.item() != round(l0.item())  # not a count of open gates
    l0.backward()
    g = form.log_alpha.grad
    assert torch.all(g[[0, 2, 3]] > 0) and g[1] == 0  # d/dlog α σ(.) = σ(1 − σ) > 0; pruned ranks: none
    # P(z > 0) by sampling Eq. 46 agrees with the closed form
    torch.manual_seed(0)
    u = torch.rand(400_000, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    for i in (0, 2):
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la[i]) / TAU)
        p_mc = ((s * (ZETA - GAMMA) + GAMMA) > 0).double().mean().item()
        assert p_mc == pytest.approx(_sig(la[i].item() - TAU * math.log(-GAMMA / ZETA)), abs=3e-3)


def test_zero_update_at_init_and_gates_open():
    x, _ = tiny_data()
    model, handle = adapted("salora", rank=4)
    for layer in (model.fc1, model.fc2):
        form = _form(layer)
        assert torch.all(form.B == 0) and torch.all(form.log_alpha == 3.0)
    model.eval()
    for layer in (model.fc1, model.fc2):
        assert torch.all(_form(layer).gates() == 1)  # the deterministic gates start open
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)


def _train(model, handle, steps, check=None, lr=2e-2):
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(lr))
    model.train()
    for step in range(1, steps + 1):
        loss = model(x=x, labels=y).loss + handle.aux_loss()
        loss.backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        if check:
            check(step)
    model.eval()


def test_budget_is_met_exactly_at_t_minus_tf_and_kept():
    model, handle = adapted("salora", rank=4, **OPTS)
    forms = [_form(model.fc1), _form(model.fc2)]
    kept = []
    _train(model, handle, 20, lambda step: kept.append(sum(int(f.rank_mask.sum()) for f in forms)))
    assert kept[:13] == [8] * 13  # every rank until T − t_f = 14
    assert kept[13:] == [2 * 2] * 7  # then exactly target rank x layers, fixed
    assert all(set(f.rank_mask.tolist()) <= {0.0, 1.0} for f in forms)
    summary = handle.schedule.summary(handle)
    assert summary == {"ranks": {"fc1": int(forms[0].rank_mask.sum()), "fc2": int(forms[1].rank_mask.sum())},
                       "total": 4, "capacity": 8}
    # pruned ranks are out of the forward and out of the L0 norm
    x, _ = tiny_data()
    out = model(x).logits
    for f in forms:
        f.log_alpha.data[f.rank_mask == 0] = 50.0
        f.B.data[:, f.rank_mask == 0] = 7.0
    torch.testing.assert_close(model(x).logits, out)


def test_budget_fix_keeps_the_most_likely_open_ranks_globally():
    model, handle = adapted("salora", rank=4, **OPTS)
    f1, f2 = _form(model.fc1), _form(model.fc2)
    with torch.no_grad():
        f1.log_alpha.copy_(torch.tensor([5.0, 4.0, -1.0, 0.0]))
        f2.log_alpha.copy_(torch.tensor([1.0, 4.5, -3.0, -2.0]))
    handle.schedule.after_step(handle, None, 14)
    # top 4 of {5, 4, -1, 0, 1, 4.5, -3, -2}: 5, 4.5, 4, 1
    assert f1.rank_mask.tolist() == [1.0, 1.0, 0.0, 0.0] and f2.rank_mask.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_lagrangian_loss_and_multiplier_ascent_by_hand():
    model, handle = adapted("salora", rank=4, **{**OPTS, "salora_lambda_lr": 0.5, "salora_orth_reg": 0.2})
    perturb(handle, scale=1.0)
    sched = handle.schedule
    forms = [_form(model.fc1), _form(model.fc2)]

    def c_by_hand():
        total = sum(_sig(f.log_alpha[i].item() - TAU * math.log(-GAMMA / ZETA)) for f in forms for i in range(4))
        return total / 8 - 4 / 8  # b = 2 x 2 layers of 8 ranks

    c = c_by_hand()
    handle.before_step(None)  # one ascent step from λ = (0, 0)
    assert sched.lambdas == pytest.approx([0.5 * c, 0.5 * c * c], rel=1e-12)
    orth = 0.0
    for f in forms:
        A, B = f.A.detach(), f.B.detach()
        for i in range(4):
            for j in range(4):
                d = float(i == j)
                orth += (B[:, i] @ B[:, j] - d) ** 2 + (A[i] @ A[j] - d) ** 2  # Eq. 35
    aux = handle.aux_loss()
    expected = 0.2 * orth + sched.lambdas[0] * c + sched.lambdas[1] * c * c  # Eq. 49, Lagrangian form
    torch.testing.assert_close(aux, torch.as_tensor(expected, dtype=aux.dtype), rtol=1e-9, atol=0)
    aux.backward()
    assert all(f.log_alpha.grad.abs().sum() > 0 for f in forms)  # the budget term reaches the gates
    assert c > 0  # gates open beyond the budget: the ascent raises λ1, which then closes gates


def test_the_constraint_pulls_expected_l0_toward_the_budget():
    model, handle = adapted("salora", rank=4, **{**OPTS, "salora_total_steps": 200, "salora_final_steps": 1,
                                                  "salora_lambda_lr": 2.0})
    forms = [_form(model.fc1), _form(model.fc2)]
    start = sum(f.expected_l0().item() for f in forms)
    _train(model, handle, 60, lr=5e-2)
    end = sum(f.expected_l0().item() for f in forms)
    assert start > 7.9 and end < start - 1.0  # from every gate open toward 4 of 8


def test_masks_survive_save_and_load(tmp_path):
    model, handle = adapted("salora", rank=4, **OPTS)
    _train(model, handle, 16)
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(_form(getattr(fresh, name)).rank_mask, _form(getattr(model, name)).rank_mask)
    x, _ = tiny_data()
    fresh.eval()
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_schedule_state_roundtrip():
    model, handle = adapted("salora", rank=4, **OPTS)
    _train(model, handle, 15)
    state = handle.schedule.state_dict()
    _, other = adapted("salora", rank=4, **OPTS)
    other.schedule.load_state_dict(state)
    s = other.schedule
    assert (s.lambdas, s.fixed, s.step, s.total, s.t_final) == (handle.schedule.lambdas, True, 15, 20, 6)


def test_plan_is_required():
    model, handle = adapted("salora", rank=4, schedule="salora")
    with pytest.raises(lorazoo.LorazooError, match="handle.plan"):
        handle.before_step(None)
    handle.plan(50)
    assert (handle.schedule.total, handle.schedule.t_final) == (50, 15)


@pytest.mark.parametrize("bad, match", [
    (dict(form="lora"), "form='salora'"),
    (dict(salora_target_rank=5), "salora_target_rank"),
    (dict(salora_target_rank=0), "salora_target_rank"),
    (dict(salora_gamma=0.1), "salora_gamma"),
    (dict(salora_zeta=1.0), "salora_zeta"),
    (dict(salora_temperature=0), "salora_temperature"),
    (dict(salora_total_steps=10, salora_final_steps=10), "salora_final_steps"),
    (dict(salora_final_steps=2.5), "salora_final_steps"),
    (dict(salora_lambda_lr=-1), "salora_lambda_lr"),
    (dict(salora_orth_reg=-0.1), "salora_orth_reg"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(**{"form": "salora", "schedule": "salora", "rank": 4, **bad})


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    from test_checkpoint import allocation_survives_a_kill

    def make():
        model = TinyNet(dtype=torch.float32)
        spec = lorazoo.AdapterSpec.preset("salora", rank=4, targets=["fc1", "fc2"], salora_target_rank=2)
        return model, lorazoo.adapt(model, spec)

    handle, handle2, ref = allocation_survives_a_kill(tmp_path, make)
    fresh = make()[1].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in ref.items() if k.endswith("rank_mask"))  # it moved
