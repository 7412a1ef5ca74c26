"""SoRA (Ding et al. 2023 [57]): ΔW = s·B·diag(g)·A with a gate g sparsified by proximal steps
g ← sign(g)·max(|g| − ξ_t, 0); zero gates are pruned for good; ξ_t grows in linear stages."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, assert_layer_update, perturb, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def test_matches_dense_reference():
    model, handle = adapted("sora", rank=4, alpha=6)
    perturb(handle, scale=1.0)
    layer, form = model.fc2, _form(model.fc2)
    form.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    g, m, A, B = (t.detach() for t in (form.gate, form.rank_mask, form.A, form.B))
    delta = 1.5 * sum(g[i] * m[i] * torch.outer(B[:, i], A[i]) for i in range(4))  # s·B diag(g ⊙ m) A
    assert_layer_update(layer, form, delta)


def test_zero_update_at_init_with_a_random_gate():
    x, _ = tiny_data()
    model, handle = adapted("sora", rank=4)
    for layer in (model.fc1, model.fc2):
        form = _form(layer)
        assert torch.all(form.B == 0) and form.gate.std() > 0.1 and torch.all(form.rank_mask == 1)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)


def _steps(model, handle, steps, lr=2e-2, check=None):
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(lr))
    model.train()
    for step in range(1, steps + 1):
        (model(x=x, labels=y).loss + handle.aux_loss()).backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        before = [_form(l).gate.detach().clone() for l in (model.fc1, model.fc2)]
        masks = [_form(l).rank_mask.clone() for l in (model.fc1, model.fc2)]
        handle.after_step(opt, step)
        if check:
            check(step, before, masks)
    model.eval()


def test_proximal_step_is_soft_thresholding_and_active_count_is_exact():
    model, handle = adapted("sora", rank=4, schedule="sora", sora_xi=0.05)
    with torch.no_grad():  # some gates near zero so the threshold prunes a few
        _form(model.fc1).gate.copy_(torch.tensor([0.03, -0.5, 0.06, 1.0]))
        _form(model.fc2).gate.copy_(torch.tensor([-0.02, 0.8, 0.0401, -0.9]))
    forms = [_form(model.fc1), _form(model.fc2)]
    counts = []

    def check(step, before, masks):
        for f, g0, m0 in zip(forms, before, masks):
            ref = torch.tensor([0.0 if m0[i] == 0 or abs(v) <= 0.05 else (abs(v) - 0.05) * (1 if v > 0 else -1)
                                for i, v in enumerate(g0.tolist())], dtype=torch.float64)
            torch.testing.assert_close(f.gate.detach(), ref, rtol=0, atol=1e-15)
            assert f.rank_mask.tolist() == [float(v != 0) for v in ref.tolist()]
        counts.append(sum(int(f.rank_mask.sum()) for f in forms))

    _steps(model, handle, 12, check=check)
    assert counts[-1] < 8 and sorted(counts, reverse=True) == counts  # ranks are pruned, never regrown
    assert counts[-1] == sum(int(torch.count_nonzero(f.gate)) for f in forms)
    assert handle.schedule.summary(handle) == {
        "ranks": {"fc1": int(forms[0].rank_mask.sum()), "fc2": int(forms[1].rank_mask.sum())},
        "total": counts[-1], "capacity": 8}


def test_pruned_ranks_stay_zero_and_out_of_the_forward():
    model, handle = adapted("sora", rank=4, schedule="sora", sora_xi=0.05)
    with torch.no_grad():
        _form(model.fc1).gate.copy_(torch.tensor([0.01, -0.5, 0.6, 1.0]))
    _steps(model, handle, 1)
    f = _form(model.fc1)
    assert f.rank_mask.tolist() == [0.0, 1.0, 1.0, 1.0] and f.gate[0] == 0
    _steps(model, handle, 15, lr=5e-2)  # Adam's momentum would move the gate back; the mask holds it
    assert f.rank_mask[0] == 0 and f.gate[0] == 0
    x, _ = tiny_data()
    out = model(x).logits
    with torch.no_grad():
        f.gate[0] = 3.0
    torch.testing.assert_close(model(x).logits, out)


def test_sparsifying_schedule_stages_are_linear():
    _, handle = adapted("sora", rank=4, schedule="sora", sora_xi=0.0, sora_max_xi=6e-4, sora_stages=4,
                        sora_total_steps=20)
    sched = handle.schedule
    expected = [0.0, 2e-4, 4e-4, 6e-4]  # np.linspace(0, 6e-4, 4), one value per 5-step stage
    for step in range(1, 21):
        assert sched.xi_at(step) == pytest.approx(expected[(step - 1) // 5], abs=1e-18), step
    _, plain = adapted("sora", rank=4, schedule="sora", sora_xi=1e-3)
    assert plain.schedule.xi_at(1) == plain.schedule.xi_at(10 ** 6) == 1e-3


def test_rising_threshold_prunes_more():
    model, handle = adapted("sora", rank=4, schedule="sora", sora_xi=0.0, sora_max_xi=0.04, sora_stages=3,
                            sora_total_steps=30)
    forms = [_form(model.fc1), _form(model.fc2)]
    counts = []
    _steps(model, handle, 30, check=lambda s, b, m: counts.append(sum(int(f.rank_mask.sum()) for f in forms)))
    assert counts[9] == 8 and counts[-1] < 8  # ξ = 0 in the first stage prunes nothing


def test_l1_term_is_the_mean_absolute_gate():
    model, handle = adapted("sora", rank=4, schedule="sora", sora_l1=10.0)
    f1, f2 = _form(model.fc1), _form(model.fc2)
    f1.rank_mask[2] = 0.0
    expected = 10.0 * (sum(abs(v) for i, v in enumerate(f1.gate.tolist()) if i != 2)
                       + sum(abs(v) for v in f2.gate.tolist())) / 8
    assert handle.aux_loss().item() == pytest.approx(expected, rel=1e-12)
    _, none = adapted("sora", rank=4, schedule="sora")
    assert none.aux_loss().item() == 0


def test_masks_and_gates_survive_save_and_load(tmp_path):
    model, handle = adapted("sora", rank=4, schedule="sora", sora_xi=0.05)
    with torch.no_grad():
        _form(model.fc2).gate.copy_(torch.tensor([0.01, -0.5, 0.02, 1.0]))
    _steps(model, handle, 5)
    assert _form(model.fc2).rank_mask.sum() == 2
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    for name in ("fc1", "fc2"):
        a, b = _form(getattr(fresh, name)), _form(getattr(model, name))
        torch.testing.assert_close(a.rank_mask, b.rank_mask)
        torch.testing.assert_close(a.gate, b.gate)
    x, _ = tiny_data()
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_schedule_state_roundtrip_and_plan():
    _, handle = adapted("sora", rank=4, schedule="sora", sora_max_xi=1e-3)
    with pytest.raises(lorazoo.LorazooError, match="handle.plan"):
        handle.schedule.xi_at(1)
    handle.plan(40)
    handle.schedule.step = 7
    _, other = adapted("sora", rank=4, schedule="sora", sora_max_xi=1e-3)
    other.schedule.load_state_dict(handle.schedule.state_dict())
    assert (other.schedule.step, other.schedule.total) == (7, 40)


@pytest.mark.parametrize("bad, match", [
    (dict(form="lora"), "form='sora'"),
    (dict(sora_xi=-1e-3), "sora_xi"),
    (dict(sora_xi=1e-3, sora_max_xi=1e-4), "sora_max_xi"),
    (dict(sora_stages=0), "sora_stages"),
    (dict(sora_stages=2.5), "sora_stages"),
    (dict(sora_l1=-1.0), "sora_l1"),
    (dict(sora_total_steps=0), "sora_total_steps"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(**{"form": "sora", "schedule": "sora", "rank": 4, **bad})


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    from test_checkpoint import allocation_survives_a_kill

    def make():
        model = TinyNet(dtype=torch.float32)
        spec = lorazoo.AdapterSpec.preset("sora", rank=4, targets=["fc1", "fc2"], sora_xi=0.05)
        return model, lorazoo.adapt(model, spec)

    handle, handle2, ref = allocation_survives_a_kill(tmp_path, make)
    fresh = make()[1].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in ref.items() if k.endswith("rank_mask"))  # it moved
