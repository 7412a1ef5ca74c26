"""LLaVA-MoLE [97]: top-1 sparse LoRA experts in the MLP layers, plain LoRA in the others."""
import pytest
import torch

import lorazoo
from moe_reference import route, switch
from test_mola import Blocks
from tiny import TinyNet, adapted, perturb, tiny_data, trains_and_reloads


def _form(layer):
    return layer.adapters["default"].form


def _blocks(**kw):
    model = Blocks(2)
    spec = lorazoo.AdapterSpec(form="llava_mole", targets=["q", "v"], llava_mole_mlp=["v"], **{"rank": 8, **kw})
    return model, lorazoo.adapt(model, spec)


def test_experts_on_mlp_layers_plain_lora_elsewhere():
    model, handle = _blocks(experts=4)
    for b in model.layers:
        q, v = _form(b["q"]), _form(b["v"])
        assert (q.experts, q.expert_rank, q.is_mlp) == (1, 8, False)
        assert (v.experts, v.expert_rank, v.is_mlp, v.gate.top_k) == (4, 2, True, 1)


def test_mlp_layer_matches_top_1_reference_scaled_by_its_probability():
    model, handle = _blocks(experts=4, alpha=4)
    perturb(handle)
    layer = model.layers[0]["v"]
    f = _form(layer)
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    flat = x.reshape(-1, 10)
    probs, _, chosen = route(flat, f.gate.weight.detach(), 1)
    A, B = f.A.detach(), f.B.detach()
    ref = flat @ layer.base.weight.detach().T + layer.base.bias.detach()
    for t in range(flat.shape[0]):
        i = int(chosen[t].argmax())  # the token's one expert, weighted by g_i (Switch)
        ref[t] += f.scale * probs[t, i] * (B[:, 2 * i:2 * i + 2] @ (A[2 * i:2 * i + 2] @ flat[t]))
    torch.testing.assert_close(layer(x), ref.reshape(2, 5, 10), rtol=1e-9, atol=1e-12)
    assert torch.all((f.gate.last.gates != 0).sum(-1) == 1)


def test_non_mlp_layer_is_exactly_lora():
    model, handle = _blocks(experts=4, alpha=4)
    perturb(handle)
    layer = model.layers[1]["q"]
    f = _form(layer)
    x = torch.randn(3, 10, dtype=torch.float64)
    ref = x @ (layer.base.weight.detach() + 0.5 * f.B.detach() @ f.A.detach()).T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-9, atol=1e-12)


def test_router_learns_from_the_task_and_balancing_loss_on_mlp_layers_only():
    model, handle = _blocks(experts=4, llava_mole_aux_weight=0.5)
    perturb(handle)
    x = torch.randn(6, 10, dtype=torch.float64)
    model.train()
    out = model(x).logits
    total, h = 0, x
    for b in model.layers:
        probs, _, chosen = route(h, _form(b["v"]).gate.weight.detach(), 1)
        total = total + 0.5 * switch(probs, chosen)
        h = torch.tanh(b["q"](h) + b["v"](h)).detach()
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, total, rtol=1e-9, atol=1e-12)
    out.sum().backward()
    assert _form(model.layers[0]["v"]).gate.weight.grad.abs().sum() > 0  # g_i scales the output


def test_starts_as_base_trains_and_save_load(tmp_path):
    x, _ = tiny_data()
    model, handle = adapted("llava_mole", rank=8, experts=4)  # fc1, fc2: MLP names
    assert _form(model.fc1).experts == 4
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    trains_and_reloads(model, handle, tmp_path)


def test_preset():
    spec = lorazoo.AdapterSpec.preset("llava_mole")
    assert (spec.form, spec.rank, spec.options["experts"]) == ("llava_mole", 8, 8)


@pytest.mark.parametrize("kw,match", [
    ({"llava_mole_mlp": "mlp"}, "llava_mole_mlp"), ({"llava_mole_mlp": [""]}, "llava_mole_mlp"),
    ({"llava_mole_aux_weight": -1}, "llava_mole_aux_weight"), ({"experts": 0}, "experts"),
    ({"top_k": 2}, "unknown option"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="llava_mole", **kw)
