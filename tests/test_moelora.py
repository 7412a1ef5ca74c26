"""MoELoRA (study Eq. 124-127 [85]): top-k LoRA experts, Switch balancing and the expert contrastive loss."""
import copy

import pytest
import torch

import lorazoo
from moe_reference import contrastive, expert_outputs, mixture_output, route, switch
from tiny import TinyNet, adapted, perturb, single_layer, tiny_data, trains_and_reloads


def _form(layer):
    return layer.adapters["default"].form


def _parts(layer):
    f = _form(layer)
    return f.A.detach(), f.B.detach(), f.gate.weight.detach()


@pytest.mark.parametrize("rank,E,k", [(8, 8, 2), (6, 3, 1), (8, 4, 2)])
def test_matches_dense_reference_per_token(rank, E, k):
    model, handle, layer = single_layer("moelora", rank=rank, alpha=6, experts=E, top_k=k)
    perturb(handle)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    A, B, Wg = _parts(layer)
    ref = mixture_output(x, layer.base.weight.detach(), layer.base.bias.detach(), A, B, Wg, E, k, 6 / rank)
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("E,k,tau", [(4, 2, 1.0), (3, 1, 0.5), (6, 3, 2.0)])
def test_aux_loss_is_balance_plus_contrastive_eq_126_127(E, k, tau):
    model, handle, layer = single_layer("moelora", rank=2 * E, experts=E, top_k=k, moelora_tau=tau,
                                        moelora_weight=0.3, moelora_balance=0.2)
    perturb(handle)
    x = torch.randn(2, 4, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    model.train()
    model(x)
    A, B, Wg = _parts(layer)
    probs, _, chosen = route(x, Wg, k)
    outs, labels = expert_outputs(x, A, B, Wg, E, k)
    ref = 0.2 * switch(probs, chosen) + 0.3 * contrastive(outs, labels, tau)
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    loss.backward()
    f = _form(layer)
    assert f.B.grad.abs().sum() > 0 and f.A.grad.abs().sum() > 0 and f.gate.weight.grad.abs().sum() > 0


def test_contrastive_loss_alone_and_token_sample():
    """moelora_tokens caps the loss's tokens: evenly spaced over the flattened batch."""
    model, handle, layer = single_layer("moelora", rank=4, experts=4, top_k=2, moelora_balance=0.0,
                                        moelora_weight=1.0, moelora_tokens=4)
    perturb(handle)
    x = torch.randn(10, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model.train()
    model(x)
    A, B, Wg = _parts(layer)
    picked = x[[0, 3, 6, 9]]  # linspace(0, 9, 4) rounded
    outs, labels = expert_outputs(picked, A, B, Wg, 4, 2)
    torch.testing.assert_close(handle.aux_loss(), contrastive(outs, labels, 1.0), rtol=1e-9, atol=1e-12)


def test_contrastive_pulls_one_experts_outputs_together():
    """The loss is lower when each expert's outputs align and differ from other experts' (its aim)."""
    from lorazoo.routing import expert_contrastive_loss
    E, out = 3, 6
    B = torch.eye(out, E, dtype=torch.float64)  # expert i writes along axis i only: rank-1 experts
    selected = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.bool)
    h = torch.ones(6, E, dtype=torch.float64) * 2
    distinct = expert_contrastive_loss(h, selected, B, 1.0)
    mixed = expert_contrastive_loss(h, selected, torch.zeros(out, E, dtype=torch.float64) + 1.0, 1.0)
    assert distinct < mixed
    torch.testing.assert_close(mixed, torch.log(torch.tensor(5.0, dtype=torch.float64)))  # all equal: log(1 + 4)


def test_starts_as_base_and_contrastive_gradient_is_zero_at_init():
    x, _ = tiny_data()
    model, handle = adapted("moelora", rank=8, experts=4, moelora_balance=0.0)
    model.train()
    out = model(x).logits
    torch.testing.assert_close(out, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    loss = handle.aux_loss()
    loss.backward()  # B = 0: every output is 0, so is every similarity and the loss's gradient
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        assert torch.count_nonzero(f.A.grad) == 0 and torch.count_nonzero(f.B.grad) == 0


def test_loss_only_in_training_and_copy_drops_the_graph():
    model, handle, layer = single_layer("moelora", rank=4, experts=4)
    perturb(handle)
    x = torch.randn(6, 20, dtype=torch.float64)
    model.eval()
    model(x)
    assert handle.aux_loss() == 0 and _form(layer)._sample is None
    model.train()
    with torch.no_grad():
        model(x)
    assert _form(layer).aux_loss() is None
    model(x)
    assert _form(layer).aux_loss() > 0
    c = copy.deepcopy(model)  # the kept activations carry a graph, which a copy must not
    assert _form(c[0])._sample is None


def test_top_k_sparsity_and_router_stats():
    model, handle, layer = single_layer("moelora", rank=8, experts=8, top_k=2)
    perturb(handle)
    x = torch.randn(7, 20, dtype=torch.float64)
    model(x)
    g = _form(layer).gate.last.gates
    assert torch.all((g != 0).sum(-1) == 2)
    s = handle.router_stats()["0"]
    torch.testing.assert_close(s["load"].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_trains_and_save_load(tmp_path):
    model, handle = adapted("moelora", rank=8, experts=4)
    trains_and_reloads(model, handle, tmp_path)


def test_preset():
    spec = lorazoo.AdapterSpec.preset("moelora")
    assert (spec.form, spec.rank, spec.options["experts"], spec.options["top_k"]) == ("moelora", 8, 8, 2)


@pytest.mark.parametrize("kw,match", [
    ({"moelora_tau": 0}, "moelora_tau"), ({"moelora_weight": -1}, "moelora_weight"),
    ({"moelora_balance": -0.1}, "moelora_balance"), ({"moelora_tokens": 1}, "moelora_tokens"),
    ({"experts": 4, "top_k": 5}, "top_k"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="moelora", **kw)
