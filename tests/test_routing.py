"""The shared router (lorazoo.routing): dense / top-k gates, auxiliary losses, statistics."""
import copy

import pytest
import torch

from lorazoo import routing
from lorazoo.routing import Router
from moe_reference import localized, route, switch
from tiny import adapted, perturb, tiny_data


def _router(E=5, k=None, renormalize=True, n_in=7, seed=0):
    torch.manual_seed(seed)
    r = Router(n_in, E, top_k=k, renormalize=renormalize).double()
    with torch.no_grad():
        r.weight.normal_()
    return r


def _x(shape=(9, 7), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_dense_gates_are_the_softmax():
    r, x = _router(), _x()
    probs, _, _ = route(x, r.weight.detach(), k=5)
    torch.testing.assert_close(r(x), probs, rtol=1e-12, atol=0)
    assert r.dense and r.last.selected is None


@pytest.mark.parametrize("renormalize", [True, False])
def test_top_k_selects_and_renormalizes(renormalize):
    r, x = _router(E=6, k=2, renormalize=renormalize), _x((4, 3, 7))
    gates = r(x)
    probs, ref, chosen = route(x, r.weight.detach(), k=2, renormalize=renormalize)
    torch.testing.assert_close(gates.reshape(-1, 6), ref, rtol=1e-12, atol=0)
    assert gates.shape == (4, 3, 6)
    assert torch.equal((gates.reshape(-1, 6) != 0).double(), chosen)
    assert torch.all((gates != 0).sum(-1) == 2)
    if renormalize:
        torch.testing.assert_close(gates.sum(-1), torch.ones(4, 3, dtype=torch.float64))
    else:  # Eq. 125 as written: the chosen g_i unchanged
        torch.testing.assert_close(gates.reshape(-1, 6), probs * chosen, rtol=1e-12, atol=0)


def test_routing_runs_in_float32_at_least():
    r = Router(7, 4, top_k=2).to(torch.bfloat16)
    x = _x().to(torch.bfloat16)
    gates = r(x)
    assert gates.dtype == torch.bfloat16
    assert r.last.probs.dtype == torch.float32 and r.last.gates.dtype == torch.float32
    torch.testing.assert_close(r.last.gates.sum(-1), torch.ones(9))


def test_switch_loss_matches_eq_126_and_trains_the_router():
    r, x = _router(E=6, k=2), _x((5, 4, 7))
    r.train()
    r(x)
    probs, _, chosen = route(x, r.weight.detach(), k=2)
    loss = routing.switch_loss(r.training_routing())
    torch.testing.assert_close(loss, switch(probs, chosen), rtol=1e-10, atol=0)
    loss.backward()
    assert r.weight.grad.abs().sum() > 0


def test_switch_loss_of_uniform_routing_is_k():
    r = Router(7, 4, top_k=2).double().train()
    with torch.no_grad():
        r.weight.zero_()
    r(_x())
    torch.testing.assert_close(routing.switch_loss(r.training_routing()), torch.tensor(2.0, dtype=torch.float64))


def test_localized_balance_loss_matches_eq_128_129():
    r, x = _router(E=6, k=2), _x((3, 4, 7))
    r.train()
    r(x)
    types = torch.tensor([1, 0, 1])
    loss = routing.localized_balance_loss(r.last.gates, types, 0.1)
    _, gates, _ = route(x, r.weight.detach(), k=2)
    torch.testing.assert_close(loss, localized(gates, 3, types, 0.1), rtol=1e-10, atol=0)
    loss.backward()
    assert r.weight.grad.abs().sum() > 0


def test_importance_counts_one_token_samples_for_2d_inputs():
    g = torch.rand(5, 4, dtype=torch.float64)
    torch.testing.assert_close(routing.importance(g), g)
    torch.testing.assert_close(routing.importance(g.reshape(5, 1, 4)), g)
    torch.testing.assert_close(routing.importance(g.reshape(1, 5, 4)), g.sum(0, keepdim=True))


def test_cv_squared():
    z = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(routing.cv_squared(z), torch.tensor(14 / 3 / 9, dtype=torch.float64))
    assert routing.cv_squared(z[:1]) == 0


def test_gate_experts_and_spread_match_loops():
    g = torch.rand(3, 4, dtype=torch.float64)
    h = torch.rand(3, 8, dtype=torch.float64)  # 4 experts of 2 units
    ref = torch.cat([h[:, 2 * i:2 * i + 2] * g[:, i:i + 1] for i in range(4)], dim=1)
    torch.testing.assert_close(routing.gate_experts(h, g), ref)
    torch.testing.assert_close(routing.gate_experts(h[:, :4], g), h[:, :4] * g)  # rank-1 experts
    s = torch.rand(3, 2, dtype=torch.float64)
    torch.testing.assert_close(routing.spread(s, g), torch.cat([s * g[:, i:i + 1] for i in range(4)], dim=1))


def test_losses_only_from_training_forwards():
    r = _router(E=4, k=2)
    r.eval()
    r(_x())
    assert r.last is not None and r.training_routing() is None
    r.train()
    with torch.no_grad():
        r(_x())
    assert r.training_routing() is None
    r(_x())
    assert r.training_routing() is not None


def test_router_copies_without_its_graph():
    r = _router(E=4, k=2).train()
    r(_x())
    c = copy.deepcopy(r)
    assert c.last is None and torch.equal(c.weight, r.weight)


@pytest.mark.parametrize("form,kw,k", [("loramoe", {"experts": 4, "top_k": 2}, 2),
                                       ("goat", {"experts": 4, "top_k": 1, "init": "default"}, 1),
                                       ("hydralora", {"experts": 3}, 3)])
def test_router_stats_per_layer(form, kw, k):
    model, handle = adapted(form, rank=4, **kw)
    perturb(handle)
    assert handle.router_stats() == {}  # no forward yet
    x, _ = tiny_data(n=10)
    model.eval()
    model(x)
    stats = handle.router_stats()
    assert set(stats) == {"fc1", "fc2"}
    E = kw["experts"]
    W = model.fc1.adapters["default"].form.gate.weight.detach()
    probs, gates, chosen = route(x, W, k)
    s = stats["fc1"]
    torch.testing.assert_close(s["prob"], probs.mean(0))
    torch.testing.assert_close(s["gate"], gates.mean(0))
    torch.testing.assert_close(s["load"], chosen.mean(0) / k)
    for s in stats.values():
        assert s["gate"].shape == s["load"].shape == (E,)
        torch.testing.assert_close(s["load"].sum(), torch.tensor(1.0, dtype=s["load"].dtype))
        torch.testing.assert_close(s["gate"].sum(), torch.tensor(1.0, dtype=s["gate"].dtype))


# --- router options of the Tier 3 mixtures (capacity, gate dropout, threshold, noise) ---------------
def test_within_capacity_keeps_each_experts_first_slots_in_token_order():
    sel = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    kept = routing.within_capacity(sel, 3)
    flat, ref = sel.reshape(-1, 6), torch.zeros(20, 6, dtype=torch.bool)
    for i in range(6):
        seen = 0
        for t in range(20):
            if flat[t, i]:
                seen += 1
                ref[t, i] = seen <= 3
    assert torch.equal(kept.reshape(-1, 6), ref) and kept.shape == sel.shape


def test_gate_units_scales_experts_of_different_ranks():
    h = torch.rand(3, 6, dtype=torch.float64)  # ranks 1, 2, 3
    g = torch.rand(3, 3, dtype=torch.float64)
    ref = torch.cat([h[:, :1] * g[:, :1], h[:, 1:3] * g[:, 1:2], h[:, 3:] * g[:, 2:]], dim=1)
    torch.testing.assert_close(routing.gate_units(h, g, torch.tensor([1, 2, 3])), ref)


def test_router_options_that_cannot_combine_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        Router(7, 4, top_k=4, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity"):
        Router(7, 4, threshold=0.25, capacity_factor=1.0)
    with pytest.raises(ValueError, match="noisy"):
        Router(7, 4, threshold=0.25, noisy=True)


def test_gate_dropout_and_noise_only_in_training():
    torch.manual_seed(0)
    r = Router(7, 5, top_k=2, gate_dropout=0.5, noisy=True).double()
    x = _x()
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a, b)
    probs, ref, _ = route(x, r.weight.detach(), k=2)
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=0)  # eval: the plain top-k, σ rows unused
    r.train()
    assert not torch.equal(r(x), a)
    assert "noisy" in repr(r) and "gate_dropout=0.5" in repr(r)
