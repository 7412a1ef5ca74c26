"""FLoRA (Si et al. 2024 [71]), linear case: ΔW = s·B G A (Tucker, N = 2), G zero, B, A ~ N(0, 1/(2r))."""
import math

import pytest
import torch

import lorazoo
from lorazoo.forms.flora_si import FLoRASi
from lorazoo.forms.moslora import MoSLoRA
from tiny import TinyNet, adapted, layer_input, perturb, single_layer, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def tucker_reference(G, A1, A2):
    """G ×1 A1 ×2 A2 entrywise: ΔW[o, i] = Σ_ab A2[o, b]·G[b, a]·A1[i, a] (A1 (in, r), A2 (out, r))."""
    out = torch.zeros(A2.shape[0], A1.shape[0], dtype=torch.float64)
    for a in range(G.shape[1]):
        for b in range(G.shape[0]):
            out += G[b, a] * torch.outer(A2[:, b], A1[:, a])
    return out


def test_matches_tucker_reference_and_merges():
    model, handle, layer = single_layer("flora_si", rank=3, alpha=2, scale="constant")
    perturb(handle)
    f = _form(layer)
    ref = 2 * tucker_reference(f.G.detach(), f.A.detach().T, f.B.detach())
    x = layer_input(features=20)
    torch.testing.assert_close(f.delta_weight(layer.linear_weight()), ref, rtol=1e-10, atol=1e-12)
    out = layer(x)
    torch.testing.assert_close(out, x @ (layer.base.weight.detach() + ref).T + layer.base.bias.detach(),
                               rtol=1e-10, atol=1e-12)
    handle.merge()
    torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-12)


def test_init_core_zero_factors_gaussian_and_starts_as_base():
    torch.manual_seed(0)
    model, handle, layer = single_layer("flora_si", in_features=400, out_features=300, rank=8)
    f = _form(layer)
    assert torch.count_nonzero(f.G) == 0 and f.G is f.M
    for t in (f.A, f.B):
        assert abs(t.std().item() - 1 / math.sqrt(16)) < 0.01 and abs(t.mean().item()) < 0.01
    x, labels = tiny_data(16)
    model, handle = adapted("flora_si", rank=4)
    out = model(x=x, labels=labels)
    torch.testing.assert_close(out.logits, TinyNet()(x).logits, rtol=0, atol=0)
    out.loss.backward()
    f = model.fc2.adapters["default"].form
    assert f.G.grad.abs().sum() > 0 and f.B.grad.abs().sum() == 0 and f.A.grad.abs().sum() == 0


def test_shares_moslora_code():
    assert issubclass(FLoRASi, MoSLoRA)
    assert FLoRASi.delta is MoSLoRA.delta and FLoRASi.delta_weight is MoSLoRA.delta_weight


def test_rank_mask_before_the_core():
    model, handle, layer = single_layer("flora_si", rank=3)
    perturb(handle)
    f = _form(layer)
    mask = torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64)
    x, y = layer_input(features=20), layer_input(features=24, seed=2)
    ref = y + f.scale * x @ tucker_reference(f.G.detach() * mask, f.A.detach().T, f.B.detach()).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-10, atol=1e-12)


def test_factor_init_sets_identity_core_default_keeps_zero():
    x, _ = tiny_data(16)
    base = TinyNet()(x).logits
    model, handle = adapted("flora_si", rank=4, init="pissa")
    f = model.fc2.adapters["default"].form
    torch.testing.assert_close(f.G.detach(), torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
    ad = model.fc2.adapters["default"]
    W0 = model.fc2.base.weight.detach() - ad.shift_B @ ad.shift_A
    U, S, Vh = torch.linalg.svd(W0)
    torch.testing.assert_close(f.delta_weight(W0), U[:, :4] * S[:4] @ Vh[:4], rtol=1e-6, atol=1e-9)
    model, handle = adapted("flora_si", rank=4)
    assert torch.count_nonzero(model.fc2.adapters["default"].form.G) == 0


def test_preset_and_refusals():
    spec = lorazoo.AdapterSpec.preset("flora_si")
    assert spec.form == "flora_si" and spec.scale == "constant" and spec.alpha == 4
    with pytest.raises(lorazoo.SpecError, match="moslora_mixer_init"):
        lorazoo.AdapterSpec(form="flora_si", moslora_mixer_init="orthogonal")
    with pytest.raises(lorazoo.SpecError, match="lora_pro"):
        lorazoo.AdapterSpec(form="flora_si", optim="lora_pro")
