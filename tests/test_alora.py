"""ALoRA (Liu et al. 2024 [60]; study Eq. 50): 0/1 gates on pre-allocated LoRA ranks; ranks scored by
ablation IS(r) = S(M) − S(M∖r) + S(M_r), the lowest pruned and their budget given to unpruned layers."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, assert_layer_update, perturb, tiny_data

OPTS = dict(schedule="alora", alora_total_steps=20, alora_warmup_steps=4, alora_interval=5, alora_rounds=3,
            alora_prune=2)


def _form(layer):
    return layer.adapters["default"].form


def _batch():
    x, y = tiny_data()
    return {"x": x, "labels": y}


def test_matches_dense_reference():
    model, handle = adapted("alora", rank=4, alpha=6)
    perturb(handle)
    layer, form = model.fc2, _form(model.fc2)
    assert form.rank_mask.tolist() == [1.0, 1.0, 0.0, 0.0]  # half the slots active at the start
    form.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    A, B, m = form.A.detach(), form.B.detach(), form.rank_mask
    delta = 1.5 * sum(m[i] * torch.outer(B[:, i], A[i]) for i in range(4))
    assert_layer_update(layer, form, delta)


def test_zero_update_at_init():
    x, _ = tiny_data()
    model, handle = adapted("alora", rank=4)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)


def _loss_with(model, masks):
    """The loss with the given gates, by hand (the reference for S)."""
    forms = [_form(model.fc1), _form(model.fc2)]
    saved = [f.rank_mask.clone() for f in forms]
    for f, m in zip(forms, masks):
        f.rank_mask.copy_(torch.tensor(m, dtype=f.rank_mask.dtype))
    model.eval()
    with torch.no_grad():
        loss = model(**_batch()).loss.item()
    for f, m in zip(forms, saved):
        f.rank_mask.copy_(m)
    return loss


def test_ablation_importance_is_eq50_by_hand():
    model, handle = adapted("alora", rank=4, **OPTS)
    perturb(handle, scale=1.0)
    handle.schedule.set_validation([_batch()])
    full = [[1, 1, 0, 0], [1, 1, 0, 0]]
    s_full = -_loss_with(model, full)
    scores = handle.schedule.importance(handle)
    for li, path in enumerate(("fc1", "fc2")):
        for j in (0, 1):
            without = [list(m) for m in full]
            without[li][j] = 0
            only = [[0, 0, 0, 0], [0, 0, 0, 0]]
            only[li][j] = 1
            expected = s_full + _loss_with(model, without) - _loss_with(model, only)  # S(M) − S(M∖r) + S(M_r)
            assert scores[path][j].item() == pytest.approx(expected, rel=1e-12)
        assert torch.all(torch.isinf(scores[path][2:]))  # inactive slots are not scored
    assert [_form(l).rank_mask.tolist() for l in (model.fc1, model.fc2)] == [[1, 1, 0, 0]] * 2  # restored


def test_round_prunes_the_lowest_and_gives_the_budget_to_unpruned_layers():
    model, handle = adapted("alora", rank=4, **{**OPTS, "alora_prune": 1})
    sched = handle.schedule
    sched.set_validation([_batch()])
    sched.importance = lambda h: {"fc1": torch.tensor([0.5, -0.2, -float("inf"), -float("inf")], dtype=torch.float64),
                                  "fc2": torch.tensor([0.1, 0.3, -float("inf"), -float("inf")], dtype=torch.float64)}
    record = sched.reallocate(handle, None)
    assert record["pruned"] == {"fc1": 1} and record["added"] == {"fc2": 1}
    assert _form(model.fc1).rank_mask.tolist() == [1.0, 0.0, 0.0, 0.0]  # the negative rank goes
    assert _form(model.fc2).rank_mask.tolist() == [1.0, 1.0, 1.0, 0.0]
    # two pruned from fc2, the only unpruned layer fc1 takes both
    sched.importance = lambda h: {"fc1": torch.tensor([0.5, -float("inf"), -float("inf"), -float("inf")],
                                                      dtype=torch.float64),
                                  "fc2": torch.tensor([0.1, 0.2, 0.05, -float("inf")], dtype=torch.float64)}
    sched.spec.options["alora_prune"] = 2
    record = sched.reallocate(handle, None)
    assert record["pruned"] == {"fc2": 2} and record["added"] == {"fc1": 2}
    assert _form(model.fc2).rank_mask.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert _form(model.fc1).rank_mask.tolist() == [1.0, 1.0, 1.0, 0.0]


def _train(model, handle, steps, check=None, lr=2e-2):
    x, y = tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(lr))
    handle.plan(steps)
    model.train()
    for step in range(1, steps + 1):
        (model(x=x, labels=y).loss + handle.aux_loss()).backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        if check:
            check(step, opt)
    model.eval()
    return opt


def test_budget_is_exact_through_every_round_and_new_ranks_start_clean():
    model, handle = adapted("alora", rank=4, **OPTS)
    forms = [_form(model.fc1), _form(model.fc2)]
    counts, before = [], {}

    def check(step, opt):
        counts.append(sum(int(f.rank_mask.sum()) for f in forms))
        if step in (4, 9, 14):
            rec = handle.schedule.history[-1]
            assert rec["step"] == step and sum(rec["pruned"].values()) == 2 == sum(rec["added"].values())
            for f in forms:  # a newly given rank: B column zero, zero Adam state
                for j in torch.nonzero(f.rank_mask).flatten().tolist():
                    if f.B[:, j].abs().sum() == 0:
                        for p, dim in ((f.A, 0), (f.B, 1)):
                            for v in opt.state[p].values():
                                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                                    assert torch.all(v.select(dim, j) == 0)

    _train(model, handle, 20, check)
    assert counts == [4] * 20  # 2 + 2 active ranks all along: the budget moves, it does not change
    assert len(handle.schedule.history) == 3  # rounds at steps 4, 9, 14 (the last training batch as data)
    summary = handle.schedule.summary(handle)
    assert summary["total"] == 4 and summary["capacity"] == 8 and summary["rounds"] == handle.schedule.history


def test_reallocation_changes_the_output_only_by_the_pruned_ranks():
    model, handle = adapted("alora", rank=4, **OPTS)
    perturb(handle)
    sched = handle.schedule
    sched.set_validation([_batch()])
    x, _ = tiny_data()
    model.eval()
    masks = [_form(l).rank_mask.clone() for l in (model.fc1, model.fc2)]
    sched.reallocate(handle, None)
    after = model(x).logits
    kept = [f.rank_mask.clone() for f in (_form(model.fc1), _form(model.fc2))]
    for f, m0, m1 in zip((_form(model.fc1), _form(model.fc2)), masks, kept):
        f.rank_mask.copy_(m0 * m1)  # the old ranks that survived, without the new ones
    torch.testing.assert_close(model(x).logits, after)  # new ranks add nothing (B column zero)


def test_reallocated_ranks_survive_save_and_load(tmp_path):
    model, handle = adapted("alora", rank=4, **OPTS)
    _train(model, handle, 10)
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(_form(getattr(fresh, name)).rank_mask, _form(getattr(model, name)).rank_mask)
    x, _ = tiny_data()
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_needs_data_and_plan():
    model, handle = adapted("alora", rank=4, schedule="alora")
    with pytest.raises(lorazoo.LorazooError, match="set_validation"):
        handle.schedule.performance(handle)
    with pytest.raises(lorazoo.LorazooError, match="set_validation"):
        handle.schedule.set_validation([])
    with pytest.raises(lorazoo.LorazooError, match="handle.plan"):
        handle.schedule.after_step(handle, None, 1)
    handle.plan(100)
    assert handle.schedule.rounds_at == [25, 40, 55]
    handle.plan(50)  # a short run does the rounds that fit before its last step
    assert handle.schedule.rounds_at == [12, 20, 28]
    handle.plan(3)
    assert handle.schedule.rounds_at == [1, 2]


def test_schedule_state_roundtrip():
    model, handle = adapted("alora", rank=4, **OPTS)
    _train(model, handle, 10)
    _, other = adapted("alora", rank=4, **OPTS)
    other.schedule.load_state_dict(handle.schedule.state_dict())
    assert other.schedule.history == handle.schedule.history and other.schedule.step == 10


@pytest.mark.parametrize("bad, match", [
    (dict(form="lora"), "form='alora'"),
    (dict(alora_init_rank=5), "alora_init_rank"),
    (dict(alora_init_rank=0), "alora_init_rank"),
    (dict(alora_rounds=0), "alora_rounds"),
    (dict(alora_prune=0), "alora_prune"),
    (dict(alora_interval=0), "alora_interval"),
    (dict(alora_warmup_steps=2.5), "alora_warmup_steps"),
    (dict(alora_total_steps=10, alora_warmup_steps=5, alora_interval=5), "alora_rounds"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(**{"form": "alora", "schedule": "alora", "rank": 4, **bad})


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    from test_checkpoint import allocation_survives_a_kill

    def make():
        model = TinyNet(dtype=torch.float32)
        spec = lorazoo.AdapterSpec.preset("alora", rank=4, targets=["fc1", "fc2"], alora_prune=1)
        return model, lorazoo.adapt(model, spec)

    handle, handle2, ref = allocation_survives_a_kill(tmp_path, make)
    assert len(handle.schedule.history) == 3 and handle2.schedule.history == handle.schedule.history
    assert any(r["added"] != r["pruned"] for r in handle.schedule.history)  # ranks moved between layers
