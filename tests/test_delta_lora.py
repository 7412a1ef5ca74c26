"""Delta-LoRA ([153], Algorithm 1): W^(t+1) = W^(t) + λ·s·(B^(t+1)A^(t+1) − B^(t)A^(t)) for t > K."""
import pytest
import torch
import torch.nn.functional as F

import lorazoo
from test_checkpoint import merges_survive_a_kill
from tiny import TinyNet, adapted, layer_input, single_layer, tiny_data, train

K, LAM = 2, 2.0


def test_base_follows_the_delta_of_the_product_step_by_step():
    eta, steps = 0.05, 7
    model, handle, layer = single_layer("lora", schedule="delta_lora", delta_lora_start=K, delta_lora_ratio=LAM)
    form = layer.adapters["default"].form
    x, target = layer_input(n=9, features=20), layer_input(n=9, features=24, seed=4)
    W0 = layer.base.weight.detach().clone()
    opt = torch.optim.SGD(handle.param_groups(eta))
    W_ref, prev = W0.clone(), (form.B.detach().clone(), form.A.detach().clone())
    snap = None
    for step in range(1, steps + 1):
        F.mse_loss(layer(x), target).backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        B, A = form.B.detach().clone(), form.A.detach().clone()
        t = step - 1
        if t > K:  # Algorithm 1, written from the paper
            W_ref = W_ref + LAM * form.scale * (B @ A - prev[0] @ prev[1])
        if t == K:
            snap = (B, A)
        prev = (B, A)
        torch.testing.assert_close(layer.base.weight.detach(), W_ref, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(W_ref, W0)
    # the deltas telescope, and the recorded base shift is exactly the base's change
    tele = W0 + LAM * form.scale * (prev[0] @ prev[1] - snap[0] @ snap[1])
    torch.testing.assert_close(layer.base.weight.detach(), tele, rtol=1e-12, atol=1e-13)
    ad = layer.adapters["default"]
    assert ad.shift_A.shape == (2 * form.rank, 20)
    torch.testing.assert_close(ad.shift_B @ ad.shift_A, layer.base.weight.detach() - W0, rtol=1e-12, atol=1e-13)
    # the model is W_T + s·B_T·A_T
    ref = x @ (tele + form.scale * prev[0] @ prev[1]).T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_nothing_moves_before_the_start_step():
    model, handle = adapted(schedule="delta_lora", delta_lora_start=10)
    W = [getattr(model, n).base.weight.detach().clone() for n in ("fc1", "fc2")]
    train(model, handle, steps=10, lr=1e-2)  # t = 0..9 <= K: at most the block is recorded at t = K
    for n, w in zip(("fc1", "fc2"), W):
        torch.testing.assert_close(getattr(model, n).base.weight, w, rtol=0, atol=0)
        assert getattr(model, n).adapters["default"].shift_A.shape[0] == 0


def test_saved_adapter_reproduces_the_moved_base_merge_and_delete(tmp_path):
    x, _ = tiny_data()
    model, handle = adapted(schedule="delta_lora", delta_lora_start=K, delta_lora_ratio=LAM)
    losses = train(model, handle, steps=12, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    base0 = TinyNet()
    assert not torch.allclose(model.fc1.base.weight, base0.fc1.weight)  # the base did move
    out = model(x=x).logits
    handle.merge()
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-10, atol=1e-12)
    handle.unmerge()
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fresh.fc1.base.weight, model.fc1.base.weight, rtol=1e-12, atol=1e-13)
    with loaded.disabled():  # the base's change belongs to the adapter
        torch.testing.assert_close(fresh(x=x).logits, base0(x=x).logits, rtol=1e-10, atol=1e-12)
    loaded.delete()
    torch.testing.assert_close(fresh(x=x).logits, base0(x=x).logits, rtol=1e-10, atol=1e-12)


def _make():
    model = TinyNet(dtype=torch.float32)
    return model, lorazoo.adapt(model, lorazoo.AdapterSpec.preset(
        "delta_lora", rank=4, targets=["fc1", "fc2"], delta_lora_start=3))


@pytest.mark.parametrize("every, kill", [(2, 5), (4, 9)])  # before/after the start step is checkpointed
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, every, kill):
    _, _, handle2 = merges_survive_a_kill(tmp_path, _make, kill, every)
    assert handle2.schedule.state_dict() == {"started": True}


def test_training_while_merged_is_refused():
    model, handle = adapted(schedule="delta_lora", delta_lora_start=0)
    handle.merge()
    with pytest.raises(lorazoo.LorazooError, match="unmerge"):
        handle.after_step(None, 1)


@pytest.mark.parametrize("bad", [dict(dropout=0.1), dict(rank_dropout=0.2), dict(form="dora"),
                                 dict(form="moslora"), dict(form="vera"), dict(delta_lora_ratio=0),
                                 dict(delta_lora_start=-1), dict(delta_lora_start=2.5)])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(schedule="delta_lora", **bad)
