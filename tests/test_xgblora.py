"""XGBLoRA ([41]): each round, rank-1 boosters on 2 random blocks train, then merge into the base."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo.schedules.xgblora import layer_groups
from test_checkpoint import merges_survive_a_kill
from tiny import TinyNet, tiny_data

D = torch.float64


class Blocks(nn.Module):
    """Four blocks of (q, v) linears on a residual stream, HF calling convention."""

    def __init__(self, n=4, d=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "v": nn.Linear(d, d)}) for _ in range(n))
        self.head = nn.Linear(d, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        self.double()

    def forward(self, x, labels=None):
        for blk in self.layers:
            x = x + torch.tanh(blk["v"](torch.tanh(blk["q"](x))))
        logits = self.head(x)
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def _data(n=48):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g, dtype=D)
    return x, (x[:, :3] * torch.tensor([1.0, -2.0, 0.5], dtype=D)).argmax(-1)


def _adapt(**kw):
    model = Blocks()
    spec = lorazoo.AdapterSpec.preset("xgblora", targets=["q", "v"], **{"xgblora_interval": 3, **kw})
    return model, lorazoo.adapt(model, spec)


def test_layers_are_blocks():
    assert layer_groups(["model.layers.3.q", "model.layers.3.v", "model.layers.10.q", "head", "enc.fc"]) == {
        "model.layers.3": ["model.layers.3.q", "model.layers.3.v"], "model.layers.10": ["model.layers.10.q"],
        "head": ["head"], "enc.fc": ["enc.fc"]}


def test_only_the_chosen_blocks_train_with_rank_one_boosters():
    model, handle = _adapt()
    sched = handle.schedule
    assert len(sched.active) == 2 and set(sched.active) <= {f"layers.{i}" for i in range(4)}
    assert all(ad.form.rank == 1 for ad in handle.adapters().values())
    x, y = _data()
    opt = torch.optim.AdamW(handle.param_groups(1e-2, weight_decay=0.1))
    before = {p: ad.form.A.detach().clone() for p, ad in handle.adapters().items()}
    for step in (1, 2):
        model(x=x, labels=y).loss.backward()
        for path, ad in handle.adapters().items():
            on = path.rsplit(".", 1)[0] in sched.active
            assert (ad.form.B.grad is not None) == on and (ad.form.A.grad is not None) == on
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
    for path, ad in handle.adapters().items():
        on = path.rsplit(".", 1)[0] in sched.active
        assert (ad.form.B.abs().max() > 0) == on                 # idle boosters stay at zero update
        assert torch.equal(ad.form.A, before[path]) != on         # idle factors untouched (no decay either)
        assert (ad.form.A in opt.state) == on


def test_round_end_merges_the_boosters_and_draws_new_blocks():
    model, handle = _adapt()
    sched = handle.schedule
    x, y = _data()
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    for step in (1, 2):
        model(x=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
    first = list(sched.active)
    out = model(x=x).logits.detach()
    layers = handle.layers()
    W = {p: l.base.weight.detach().clone() for p, l in layers.items()}
    BA = {p: (l.adapters["default"].form.scale * l.adapters["default"].form.B @ l.adapters["default"].form.A).detach()
          for p, l in layers.items()}
    handle.after_step(opt, 3)
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-10, atol=1e-12)
    for p, l in layers.items():
        form = l.adapters["default"].form
        torch.testing.assert_close(l.base.weight.detach(), W[p] + BA[p], rtol=1e-12, atol=1e-13)
        assert (form.B == 0).all() and form.A not in opt.state
    assert sched.round == 1 and sched.active == sched.chosen(1)
    draws = {tuple(sched.chosen(j)) for j in range(12)}
    assert len(draws) > 1 and first == sched.chosen(0)  # random per round, reproducible


def test_boosters_add_up_beyond_rank_one_and_save_load(tmp_path):
    model, handle = _adapt(xgblora_interval=2)
    x, y = _data()
    opt = torch.optim.AdamW(handle.param_groups(3e-2))
    losses = []
    for step in range(1, 41):
        loss = model(x=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    ranks = [torch.linalg.matrix_rank(ad.shift_B @ ad.shift_A, rtol=1e-8).item() for ad in handle.adapters().values()]
    assert max(ranks) > 1  # a block chosen in several rounds has a rank > 1 update
    out = model(x=x).logits
    handle.save(tmp_path)
    fresh = Blocks()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x=x).logits, out, rtol=1e-10, atol=1e-12)
    loaded.delete()
    torch.testing.assert_close(fresh(x=x).logits, Blocks()(x=x).logits, rtol=1e-10, atol=1e-12)


def _make():
    model = TinyNet(dtype=torch.float32)
    return model, lorazoo.adapt(model, lorazoo.AdapterSpec.preset(
        "xgblora", targets=["fc1", "fc2"], xgblora_layers=1, xgblora_interval=0.25))


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    handle, model2, handle2 = merges_survive_a_kill(tmp_path, _make, kill=6, every=4)  # 12 steps: rounds of 3
    assert handle2.schedule.state_dict() == handle.schedule.state_dict() | {"round": 4}


def test_fraction_needs_a_plan_and_merged_is_refused():
    model = TinyNet()
    h = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("xgblora", targets=["fc1", "fc2"]))
    with pytest.raises(lorazoo.LorazooError, match="plan"):
        h.after_step(None, 1)
    h.plan(40)
    assert h.schedule.interval == 4
    h.merge()
    with pytest.raises(lorazoo.LorazooError, match="unmerge"):
        h.after_step(None, 4)


@pytest.mark.parametrize("bad", [dict(xgblora_layers=0), dict(xgblora_interval=0), dict(xgblora_interval=2.5),
                                 dict(form="dora"), dict(form="vera")])
def test_refusals(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(schedule="xgblora", **bad)


def test_composes_with_lora_fa():
    model, handle = _adapt(optim="lora_fa")
    x, y = _data()
    A0 = {p: ad.form.A.detach().clone() for p, ad in handle.adapters().items()}
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    for step in range(1, 3):
        model(x=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
    for path, ad in handle.adapters().items():
        assert not ad.form.A.requires_grad and torch.equal(ad.form.A, A0[path])
        assert (ad.form.B.abs().max() > 0) == (path.rsplit(".", 1)[0] in handle.schedule.active)
