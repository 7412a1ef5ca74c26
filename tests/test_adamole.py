"""AdaMoLE (study Eq. 130-131 [88]): LoRA experts above a learned per-token threshold."""
import pytest
import torch

import lorazoo
from moe_reference import softmax_rows
from tiny import TinyNet, adapted, perturb, single_layer, tiny_data, trains_and_reloads


def _form(layer):
    return layer.adapters["default"].form


def _adaptive(x, f, tmax):
    """Per token, from Eq. 130-131 as the authors' code: g = softmax(W_g x), τ = τ_max·σ(w_τ x + b_τ),
    s = g - τ, used experts s >= 0, gates s / Σ_used s (a zero sum left as is). Returns (g, τ, s, gates)."""
    Wg, wt, bt = f.gate.weight.detach(), f.gate.threshold_weight.detach(), f.gate.threshold_bias.detach()
    flat = x.reshape(-1, x.shape[-1])
    g = softmax_rows(flat @ Wg.T)
    tau = tmax / (1 + torch.exp(-(flat @ wt.T + bt)))  # (N, 1)
    s = g - tau
    gates = torch.zeros_like(g)
    for n in range(g.shape[0]):
        used = [i for i in range(g.shape[1]) if float(s[n, i]) >= 0]
        total = sum(float(s[n, i]) for i in used) or 1.0
        for i in used:
            gates[n, i] = s[n, i] / total
    return g, tau, s, gates


def _reference(x, layer, E, tmax):
    f = _form(layer)
    A, B = f.A.detach(), f.B.detach()
    r = A.shape[0] // E
    flat = x.reshape(-1, x.shape[-1])
    _, _, _, gates = _adaptive(x, f, tmax)
    out = flat @ layer.base.weight.detach().T + layer.base.bias.detach()
    for i in range(E):
        out = out + f.scale * gates[:, i:i + 1] * (flat @ A[i * r:(i + 1) * r].T @ B[:, i * r:(i + 1) * r].T)
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("rank,E,tmax", [(8, 8, None), (8, 4, 0.4), (6, 3, 1.0)])
def test_matches_dense_reference_per_token(rank, E, tmax):
    kw = {} if tmax is None else {"adamole_max_threshold": tmax}
    model, handle, layer = single_layer("adamole", rank=rank, alpha=6, experts=E, **kw)
    perturb(handle, scale=1.0)
    x = torch.randn(3, 4, 20, dtype=torch.float64)
    torch.testing.assert_close(model(x), _reference(x, layer, E, 1 / E if tmax is None else tmax),
                               rtol=1e-9, atol=1e-12)


def test_the_number_of_experts_varies_per_token_and_is_never_zero():
    model, handle, layer = single_layer("adamole", rank=8, experts=8, adamole_max_threshold=0.2)
    perturb(handle, scale=1.0)
    x = torch.randn(64, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model(x)
    used = (_form(layer).gate.last.gates != 0).sum(-1)
    assert int(used.min()) >= 1 and len(set(used.tolist())) > 2
    _, _, s, _ = _adaptive(x, _form(layer), 0.2)
    assert torch.equal(_form(layer).gate.last.selected, s >= 0)
    stats = handle.router_stats()["0"]  # load: each expert's share of the (variable) routing slots
    torch.testing.assert_close(stats["load"], (s >= 0).double().sum(0) / (s >= 0).sum(), rtol=1e-12, atol=0)


def test_default_max_threshold_is_one_over_experts_and_every_token_routes():
    model, handle, layer = single_layer("adamole", rank=4, experts=4)
    assert _form(layer).gate.threshold == 0.25
    with torch.no_grad():
        _form(layer).gate.threshold_bias.fill_(50.0)  # σ -> 1: τ = τ_max = 1/E, the largest it gets
    x = torch.randn(30, 20, dtype=torch.float64)
    model(x)
    assert torch.all((_form(layer).gate.last.gates != 0).sum(-1) >= 1)  # max g >= 1/E >= τ
    torch.testing.assert_close(_form(layer).gate.last.gates.sum(-1), torch.ones(30, dtype=torch.float64))


def test_aux_loss_is_the_codes_switch_loss_on_thresholded_scores():
    model, handle, layer = single_layer("adamole", rank=4, experts=4, adamole_aux_weight=0.5)
    perturb(handle)
    x = torch.randn(2, 5, 20, dtype=torch.float64)
    model.train()
    model(x)
    _, _, s, _ = _adaptive(x, _form(layer), 0.25)
    E, N = 4, 10
    ref = E * sum(float((s[:, i] >= 0).sum()) / N * s[:, i].sum() / N for i in range(E))
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, 0.5 * ref, rtol=1e-9, atol=1e-12)
    loss.backward()
    g = _form(layer).gate
    assert g.threshold_weight.grad.abs().sum() > 0 and g.threshold_bias.grad.abs().sum() > 0


def test_threshold_network_gets_the_task_gradient():
    model, handle, layer = single_layer("adamole", rank=4, experts=4)
    perturb(handle)
    model(torch.randn(6, 20, dtype=torch.float64)).sum().backward()
    assert _form(layer).gate.threshold_weight.grad.abs().sum() > 0


def test_starts_as_base_trains_and_save_load(tmp_path):
    x, _ = tiny_data()
    model, handle = adapted("adamole", rank=8, experts=4)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    trains_and_reloads(model, handle, tmp_path)
    assert any(n.endswith("gate.threshold_bias") for n in handle.state_dict())  # the threshold is saved


def test_preset():
    spec = lorazoo.AdapterSpec.preset("adamole")
    assert (spec.form, spec.rank, spec.options["experts"]) == ("adamole", 8, 8)
    assert spec.options["adamole_aux_weight"] == 1e-3


@pytest.mark.parametrize("kw,match", [
    ({"adamole_max_threshold": 0}, "adamole_max_threshold"), ({"adamole_max_threshold": 1.5}, "adamole_max_threshold"),
    ({"adamole_aux_weight": -1}, "adamole_aux_weight"), ({"experts": 0}, "experts"), ({"top_k": 2}, "unknown option"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="adamole", **kw)
