"""PeriodicLoRA ([39]; the study's code): every T steps W0 += m·s·B·A, B <- (1−m)B, A <- (1−m)A."""
import pytest
import torch

import lorazoo
from test_checkpoint import merges_survive_a_kill
from tiny import TinyNet, adapted, perturb, tiny_data, train

NAMES = ("fc1", "fc2")


def _state(model):
    out = {}
    for n in NAMES:
        f = getattr(model, n).adapters["default"].form
        out[n] = (getattr(model, n).base.weight.detach().clone(), f.B.detach().clone(), f.A.detach().clone(), f.scale)
    return out


@pytest.mark.parametrize("m", [0.1, 0.5])
def test_unload_with_momentum_is_the_studys_rule(m):
    x, _ = tiny_data()
    model, handle = adapted(schedule="periodiclora", periodiclora_interval=3, periodiclora_momentum=m)
    perturb(handle)
    before = _state(model)
    handle.after_step(None, 2)  # not the end of a stage
    assert all(torch.equal(getattr(model, n).base.weight, before[n][0]) for n in NAMES)
    handle.after_step(None, 3)
    for n, (W, B, A, s) in before.items():
        f = getattr(model, n).adapters["default"].form
        torch.testing.assert_close(getattr(model, n).base.weight.detach(), W + m * s * B @ A, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(f.B.detach(), (1 - m) * B, rtol=0, atol=1e-15)
        torch.testing.assert_close(f.A.detach(), (1 - m) * A, rtol=0, atol=1e-15)
        # the layer's total update is now (m + (1 − m)²)·s·B·A: the study's code shrinks it
        layer = getattr(model, n)
        total = layer.base.weight.detach() + f.delta_weight(layer.base.weight) - (W - 0)
        torch.testing.assert_close(total, (m + (1 - m) ** 2) * s * B @ A, rtol=1e-10, atol=1e-12)


def test_full_unload_reinitializes_and_drops_optimizer_state():
    x, y = tiny_data()
    model, handle = adapted(schedule="periodiclora", periodiclora_interval=2, periodiclora_momentum=1.0)
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    perturb(handle)
    model(x=x, labels=y).loss.backward()
    opt.step()
    out = model(x=x).logits.detach()
    before = _state(model)
    handle.after_step(opt, 2)
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-10, atol=1e-12)  # B = 0: same function
    for n, (W, B, A, s) in before.items():
        f = getattr(model, n).adapters["default"].form
        torch.testing.assert_close(getattr(model, n).base.weight.detach(), W + s * B @ A, rtol=1e-12, atol=1e-13)
        assert (f.B == 0).all() and not torch.allclose(f.A, A)
        assert f.A not in opt.state and f.B not in opt.state


def test_accumulated_update_breaks_the_rank_bound_and_the_shift_stays_compact(tmp_path):
    x, _ = tiny_data()
    base0 = TinyNet()
    model, handle = adapted(schedule="periodiclora")  # the preset's defaults: every step, m = 0.1
    losses = train(model, handle, steps=12, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    for n in NAMES:
        layer, ad = getattr(model, n), getattr(model, n).adapters["default"]
        change = layer.base.weight.detach() - getattr(base0, n).weight
        assert torch.linalg.matrix_rank(change, rtol=1e-8).item() > 4  # rank r = 4 per stage, more in total
        assert ad.shift_A.shape[0] <= min(layer.in_features, layer.out_features)  # 12 merges x 4 rows, compacted
        torch.testing.assert_close(ad.shift_B @ ad.shift_A, change, rtol=1e-10, atol=1e-12)
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
    return model, lorazoo.adapt(model, lorazoo.AdapterSpec.preset(
        "periodiclora", rank=4, targets=["fc1", "fc2"], periodiclora_interval=2, periodiclora_momentum=0.3))


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    handle, model2, handle2 = merges_survive_a_kill(tmp_path, _make, kill=8, every=3)


def test_training_while_merged_is_refused():
    model, handle = adapted(schedule="periodiclora")
    handle.merge()
    with pytest.raises(lorazoo.LorazooError, match="unmerge"):
        handle.after_step(None, 1)


@pytest.mark.parametrize("bad", [dict(periodiclora_interval=0), dict(periodiclora_interval=1.5),
                                 dict(periodiclora_momentum=0), dict(periodiclora_momentum=1.5),
                                 dict(form="dora"), dict(form="vera"), dict(form="moslora")])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(schedule="periodiclora", **bad)
