"""SiRA [94]: sparse top-k LoRA experts with an expert capacity, expert dropout and load balancing."""
import math

import pytest
import torch

import lorazoo
from moe_reference import mixture_output, route, switch
from tiny import TinyNet, adapted, perturb, single_layer, tiny_data, trains_and_reloads


def _form(layer):
    return layer.adapters["default"].form


def _capacity_reference(x, layer, E, k, cf, scale):
    """Eq. 124-125 with GShard's capacity, token by token: expert i keeps its first C = ⌈c·k·T/E⌉
    routed tokens in order; a dropped slot adds nothing, the token's other gates are unchanged."""
    f = _form(layer)
    A, B, Wg = f.A.detach(), f.B.detach(), f.gate.weight.detach()
    r = A.shape[0] // E
    flat = x.reshape(-1, x.shape[-1])
    T = flat.shape[0]
    C = math.ceil(cf * k * T / E)
    _, gates, chosen = route(flat, Wg, k)
    out = flat @ layer.base.weight.detach().T + layer.base.bias.detach()
    taken = [0] * E
    for t in range(T):
        for i in range(E):
            if chosen[t, i]:
                taken[i] += 1
                if taken[i] <= C:
                    out[t] += scale * gates[t, i] * (B[:, i * r:(i + 1) * r] @ (A[i * r:(i + 1) * r] @ flat[t]))
    return out.reshape(*x.shape[:-1], -1), C


@pytest.mark.parametrize("E,k,cf", [(4, 2, 1.0), (8, 2, 0.5), (4, 1, 1.25)])
def test_training_forward_matches_capacity_reference(E, k, cf):
    model, handle, layer = single_layer("sira", rank=E, alpha=4, experts=E, top_k=k, sira_capacity_factor=cf,
                                        sira_expert_dropout=0.0)
    perturb(handle)
    x = torch.randn(3, 5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model.train()
    ref, C = _capacity_reference(x, layer, E, k, cf, 4 / E)
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)
    kept = (_form(layer).gate.last.gates.reshape(-1, E) != 0).sum(0)
    assert int(kept.max()) <= C


def test_capacity_caps_an_overloaded_expert_exactly():
    model, handle, layer = single_layer("sira", rank=4, experts=4, top_k=1, sira_capacity_factor=1.0,
                                        sira_expert_dropout=0.0)
    perturb(handle)
    x = torch.rand(12, 20, dtype=torch.float64) + 0.5  # positive inputs
    with torch.no_grad():
        _form(layer).gate.weight.zero_()
        _form(layer).gate.weight[2] = 5.0  # every token prefers expert 2
    model.train()
    model(x)
    gates = _form(layer).gate.last.gates
    assert int((gates[:, 2] != 0).sum()) == 3  # C = ⌈1·1·12/4⌉, the first three tokens
    assert torch.all(gates[:3, 2] == 1) and torch.all(gates[3:] == 0)
    s = handle.router_stats()["0"]
    torch.testing.assert_close(s["dropped"][2], torch.tensor(9 / 12, dtype=torch.float64))
    model.eval()  # inference is dropless: every token gets its expert
    model(x)
    assert torch.all(_form(layer).gate.last.gates[:, 2] == 1)


def test_eval_is_the_dense_top_k_reference_without_dropout_or_capacity():
    model, handle, layer = single_layer("sira", rank=8, experts=8, top_k=2, sira_expert_dropout=0.5,
                                        sira_capacity_factor=0.25)
    perturb(handle)
    f = _form(layer)
    x = torch.randn(2, 6, 20, dtype=torch.float64)
    model.eval()
    ref = mixture_output(x, layer.base.weight.detach(), layer.base.bias.detach(), f.A.detach(), f.B.detach(),
                         f.gate.weight.detach(), 8, 2, f.scale)
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)  # no randomness left
    assert torch.all((f.gate.last.gates != 0).sum(-1) == 2) and f.gate.last.kept is None  # top-2, dropless


def test_expert_dropout_zeroes_or_rescales_gates_in_training():
    p = 0.5
    model, handle, layer = single_layer("sira", rank=8, experts=8, top_k=2, sira_expert_dropout=p,
                                        sira_capacity_factor=100.0)
    perturb(handle)
    f = _form(layer)
    x = torch.randn(40, 20, dtype=torch.float64)
    model.train()
    torch.manual_seed(0)
    model(x)
    _, ref, chosen = route(x, f.gate.weight.detach(), 2)
    g = f.gate.last.gates
    kept = g != 0
    assert torch.all(kept <= chosen.bool())  # only chosen experts can stay
    torch.testing.assert_close(g[kept], ref[kept] / (1 - p), rtol=1e-12, atol=0)
    dropped = 1 - kept.sum() / chosen.sum()
    assert 0.3 < float(dropped) < 0.7  # about p of the 80 chosen slots


def test_balancing_loss_is_eq_126_with_its_weight():
    model, handle, layer = single_layer("sira", rank=4, experts=4, top_k=2, sira_aux_weight=0.5)
    perturb(handle)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    model.train()
    model(x)
    probs, _, chosen = route(x, _form(layer).gate.weight.detach(), 2)
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, 0.5 * switch(probs, chosen), rtol=1e-9, atol=0)
    loss.backward()
    assert _form(layer).gate.weight.grad.abs().sum() > 0
    model.eval()
    model(x)
    assert handle.aux_loss() == 0


def test_starts_as_base_trains_and_save_load(tmp_path):
    x, _ = tiny_data()
    model, handle = adapted("sira", rank=8, experts=4, top_k=2)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    trains_and_reloads(model, handle, tmp_path)


def test_preset():
    spec = lorazoo.AdapterSpec.preset("sira")
    assert (spec.form, spec.rank, spec.options["experts"], spec.options["top_k"]) == ("sira", 8, 8, 2)
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec.preset("sira", targets=["fc1"]))
    g = _form(model.fc1).gate
    assert g.capacity_factor == 1.0 and g.gate_dropout == 0.1 and g.top_k == 2


@pytest.mark.parametrize("kw,match", [
    ({"sira_capacity_factor": 0}, "sira_capacity_factor"), ({"sira_expert_dropout": 1.0}, "sira_expert_dropout"),
    ({"sira_aux_weight": -1}, "sira_aux_weight"), ({"experts": 4, "top_k": 4}, "sparse mixture"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="sira", **kw)
