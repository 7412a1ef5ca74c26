"""MoLA [89]: routed LoRA experts with a different number of experts per layer (more in higher layers)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from moe_reference import mixture_output, route, switch
from tiny import TinyNet, adapted, perturb, tiny_data, train


class Blocks(nn.Module):
    """``n`` blocks of (q: 10 -> 10, v: 10 -> 10), HF calling convention."""

    def __init__(self, n=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(10, 10), "v": nn.Linear(10, 10)}) for _ in range(n))
        self.head = nn.Linear(10, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.double()

    def forward(self, x, labels=None):
        for b in self.layers:
            x = torch.tanh(b["q"](x) + b["v"](x))
        logits = self.head(x)
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def _form(layer):
    return layer.adapters["default"].form


def _blocks(n=4, **kw):
    model = Blocks(n)
    spec = lorazoo.AdapterSpec(form="mola", targets=["q", "v"], **{"rank": 8, **kw})
    return model, lorazoo.adapt(model, spec)


@pytest.mark.parametrize("n,counts,expected", [
    (4, [2, 4, 6, 8], [2, 4, 6, 8]),
    (8, [2, 4, 6, 8], [2, 2, 4, 4, 6, 6, 8, 8]),  # groups of two blocks
    (4, [8, 6, 4, 2], [8, 6, 4, 2]),                # MoLA-△
    (3, [2, 4, 6, 8], [2, 4, 6]),                   # ⌊j·4/3⌋ = 0, 1, 2
])
def test_experts_per_layer_follow_depth_groups(n, counts, expected):
    model, handle = _blocks(n, mola_experts=counts)
    for j, b in enumerate(model.layers):
        for name in ("q", "v"):  # every module of a block gets its block's count
            f = _form(b[name])
            assert (f.experts, f.expert_rank) == (expected[j], 1)
            assert f.A.shape == (expected[j], 10) and f.B.shape == (10, expected[j])
            assert f.gate.weight.shape == (expected[j], 10) and f.gate.top_k == 2
    assert handle.num_trainable() == sum(2 * (e * 10 + 10 * e + e * 10) for e in expected)


def test_each_layer_matches_dense_reference():
    model, handle = _blocks(4, rank=16, alpha=4)
    perturb(handle)
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    for j, b in enumerate(model.layers):
        layer, f = b["q"], _form(b["q"])
        E = [2, 4, 6, 8][j]
        assert f.expert_rank == 2  # ⌈16 / 8⌉
        ref = mixture_output(x, layer.base.weight.detach(), layer.base.bias.detach(), f.A.detach(), f.B.detach(),
                             f.gate.weight.detach(), E, 2, 4 / 16)
        torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-12)


def test_unnumbered_targets_are_blocks_in_target_order():
    model, _ = adapted("mola", rank=8, mola_experts=[2, 8])  # fc1, fc2: no block index
    assert (_form(model.fc1).experts, _form(model.fc2).experts) == (2, 8)


def test_top_k_sparsity_and_optional_balancing_loss():
    model, handle = _blocks(4, mola_aux_weight=0.5)
    perturb(handle)
    x = torch.randn(6, 10, dtype=torch.float64)
    model.train()
    model(x)
    for b in model.layers:
        assert torch.all((_form(b["q"]).gate.last.gates != 0).sum(-1) == 2)
    total, h = 0, x
    for b in model.layers:
        for name in ("q", "v"):
            probs, _, chosen = route(h, _form(b[name]).gate.weight.detach(), 2)
            total = total + 0.5 * switch(probs, chosen)
        h = torch.tanh(b["q"](h) + b["v"](h)).detach()
    torch.testing.assert_close(handle.aux_loss(), total, rtol=1e-9, atol=1e-12)
    model2, handle2 = _blocks(4)
    model2.train()
    model2(x)
    assert handle2.aux_loss() == 0  # the paper's default: no auxiliary loss


def test_starts_as_base_trains_and_save_load(tmp_path):
    x = torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model, handle = _blocks(4)
    torch.testing.assert_close(model(x).logits, Blocks(4)(x).logits, rtol=1e-9, atol=1e-12)
    losses = train(model, handle, steps=30, lr=2e-2, data=(x, y))
    assert losses[-1] < 0.9 * losses[0]
    out = model(x).logits
    handle.save(tmp_path)
    fresh = Blocks(4)
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-9, atol=1e-12)
    assert loaded.spec.options["mola_experts"] == [2, 4, 6, 8]
    assert [_form(b["v"]).experts for b in fresh.layers] == [2, 4, 6, 8]


def test_preset_and_tuple_counts():
    spec = lorazoo.AdapterSpec.preset("mola")
    assert (spec.form, spec.rank, spec.options["mola_experts"], spec.options["top_k"]) == ("mola", 8, [2, 4, 6, 8], 2)
    assert lorazoo.AdapterSpec(form="mola", mola_experts=(2, 2)) == lorazoo.AdapterSpec(form="mola", mola_experts=[2, 2])
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec.preset("mola", targets=["fc1", "fc2"]))
    assert (_form(model.fc1).experts, _form(model.fc2).experts) == (2, 6)


@pytest.mark.parametrize("kw,match", [
    ({"mola_experts": []}, "mola_experts"), ({"mola_experts": [2, 0]}, "mola_experts"),
    ({"mola_experts": "2,4"}, "mola_experts"), ({"mola_experts": [2, 1.5]}, "mola_experts"),
    ({"mola_experts": [1, 4]}, "smallest expert count"), ({"mola_aux_weight": -1}, "mola_aux_weight"),
    ({"experts": 4}, "unknown option"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="mola", **kw)
