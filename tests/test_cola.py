"""CoLA ([40]): M links; at each knot W0 += s·B·A, fresh factors, optimizer state reset."""
import pytest
import torch

import lorazoo
from test_checkpoint import merges_survive_a_kill
from tiny import TinyNet, adapted, perturb, tiny_data, train

NAMES = ("fc1", "fc2")


def test_knots_are_spread_evenly_over_the_planned_run():
    model, handle = adapted(schedule="cola")
    with pytest.raises(lorazoo.LorazooError, match="plan"):
        handle.after_step(None, 1)
    handle.plan(40)
    assert handle.schedule.knots == [13, 27]
    handle.plan(9)
    assert handle.schedule.knots == [3, 6]
    model, handle = adapted(schedule="cola", cola_chains=1)
    handle.plan(10)
    assert handle.schedule.knots == []  # one link: plain LoRA
    with pytest.raises(lorazoo.LorazooError, match="cola_chains"):
        adapted(schedule="cola", cola_chains=5)[1].plan(4)


def test_tie_a_knot_and_extend_the_chain():
    x, y = tiny_data()
    model, handle = adapted(schedule="cola", cola_chains=2, modules_to_save=["head"])
    handle.plan(10)
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    perturb(handle)
    model(x=x, labels=y).loss.backward()
    opt.step()
    out = model(x=x).logits.detach()
    before = {n: (getattr(model, n).base.weight.detach().clone(), getattr(model, n).adapters["default"].form)
              for n in NAMES}
    old = {n: (f.B.detach().clone(), f.A.detach().clone()) for n, (_, f) in before.items()}
    handle.after_step(opt, 4)  # not a knot
    assert all(torch.equal(getattr(model, n).base.weight, before[n][0]) for n in NAMES)
    handle.after_step(opt, 5)
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-10, atol=1e-12)
    for n, (W, f) in before.items():
        B, A = old[n]
        torch.testing.assert_close(getattr(model, n).base.weight.detach(), W + f.scale * B @ A, rtol=1e-12, atol=1e-13)
        assert (f.B == 0).all() and not torch.allclose(f.A, A)
        assert f.A not in opt.state and f.B not in opt.state
    assert handle.saved_modules()["head"].weight in opt.state  # only the LoRA's state is reset


def test_chain_exceeds_rank_r_and_save_load_reproduces(tmp_path):
    x, _ = tiny_data()
    base0 = TinyNet()
    torch.manual_seed(0)
    model, handle = adapted(schedule="cola", cola_chains=3)
    losses = train(model, handle, steps=30, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    for n in NAMES:
        layer = getattr(model, n)
        total = layer.base.weight.detach() + layer.adapters["default"].form.delta_weight(layer.base.weight) - getattr(base0, n).weight
        assert torch.linalg.matrix_rank(total, rtol=1e-8).item() > 4  # up to 3 links x rank 4
        assert layer.adapters["default"].shift_A.shape[0] == 2 * 4    # two knots recorded
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-10, atol=1e-12)
    loaded.delete()
    torch.testing.assert_close(fresh(x=x).logits, base0(x=x).logits, rtol=1e-10, atol=1e-12)


def _make():
    model = TinyNet(dtype=torch.float32)
    return model, lorazoo.adapt(model, lorazoo.AdapterSpec.preset("cola", rank=4, targets=["fc1", "fc2"]))


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    handle, model2, handle2 = merges_survive_a_kill(tmp_path, _make, kill=7, every=5)  # 12 steps: knots at 4 and 8
    assert handle2.schedule.knots == [4, 8]


def test_training_while_merged_is_refused():
    model, handle = adapted(schedule="cola")
    handle.plan(9)
    handle.merge()
    with pytest.raises(lorazoo.LorazooError, match="unmerge"):
        handle.after_step(None, 3)


@pytest.mark.parametrize("bad", [dict(cola_chains=0), dict(cola_chains=2.5), dict(form="dora"),
                                 dict(form="vera"), dict(form="lorma_plus")])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(schedule="cola", **bad)
