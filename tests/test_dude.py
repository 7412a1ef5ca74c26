"""DuDe (Han, Zhang, Zhang 2025 [69]): DoRA's magnitude-direction decomposition with the direction's B, A
initialized as PiSSA (B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_rᵀ, W_res = W0 - s·B·A): the preset
form="dora", init="pissa" (the paper's Fig. 1b; the study's LinearWithDude)."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, layer_input, perturb, tiny_data, train


def build(**over):
    model = TinyNet()
    spec = lorazoo.AdapterSpec.preset("dude", rank=4, alpha=8, targets=["fc1", "fc2"], **over)
    return model, lorazoo.adapt(model, spec)


def test_preset_is_dora_direction_with_pissa_init():
    p = lorazoo.AdapterSpec.preset("dude")
    assert (p.form, p.init) == ("dora", "pissa")


def test_init_from_the_papers_svd_and_starts_as_base():
    x, _ = tiny_data()
    model, handle = build()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-9)
    W0 = TinyNet().fc2.weight.detach()
    U, S, Vh = torch.linalg.svd(W0)
    f = model.fc2.adapters["default"].form
    s = 8 / 4
    B_ref, A_ref = U[:, :4] * (S[:4] / s).sqrt(), (S[:4] / s).sqrt()[:, None] * Vh[:4]
    # singular vectors are defined up to sign: compare the rank-one terms
    for k in range(4):
        torch.testing.assert_close(torch.outer(f.B[:, k], f.A[k]).detach(), torch.outer(B_ref[:, k], A_ref[k]),
                                   rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(model.fc2.base.weight.detach(), W0 - s * B_ref @ A_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(f.m.detach(), W0.norm(dim=1), rtol=1e-9, atol=1e-12)  # m = ‖W0‖_row


def test_matches_dense_reference_after_training_steps():
    model, handle = build()
    perturb(handle, scale=0.1)
    layer, f = model.fc2, model.fc2.adapters["default"].form
    W_res = layer.base.weight.detach()
    V = W_res + 2.0 * f.B.detach() @ f.A.detach()
    W = f.m.detach()[:, None] * V / V.norm(dim=1, keepdim=True)
    x = layer_input()
    torch.testing.assert_close(layer(x), x @ W.T + layer.base.bias.detach(), rtol=1e-9, atol=1e-12)
    out = model(tiny_data()[0]).logits
    handle.merge()
    torch.testing.assert_close(model(tiny_data()[0]).logits, out, rtol=1e-6, atol=1e-8)


def test_trains_magnitude_and_direction():
    model, handle = build()
    f = model.fc2.adapters["default"].form
    before = [t.detach().clone() for t in (f.m, f.B, f.A)]
    losses = train(model, handle, steps=10, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, (f.m, f.B, f.A)))


def test_composes_and_refuses():
    build(rank_dropout=0.5, scale="rslora", pissa_niter=2)  # DoRA's rank dimension, PiSSA's options
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec.preset("dude", pissa_niter=-1)
