"""NoRA (Lin et al. 2024 [79]): ΔW = s·U_r (B_i A_i) V_rᵀ, outer singular vectors of W0 frozen, inner LoRA
trainable; init 'nora' puts the top r' singular values in the inner pair and moves them out of the base."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, perturb, single_layer, tiny_data, train


def _form(layer):
    return layer.adapters["default"].form


def _svd(W, r):
    U, S, Vh = torch.linalg.svd(W)
    return U[:, :r], S[:r], Vh[:r]


def _same_subspace(Q1, Q2):
    """Orthonormal column sets spanning the same space (singular vectors have free signs)."""
    torch.testing.assert_close(Q1 @ Q1.T, Q2 @ Q2.T, rtol=1e-8, atol=1e-10)


def test_dense_reference_after_perturbation_and_merge():
    model, handle, layer = single_layer("nora", rank=4, alpha=8, nora_inner_rank=2)
    perturb(handle)
    f = _form(layer)
    U, Vt, B, A = f.U, f.Vt, f.B_inner.detach(), f.A_inner.detach()
    inner = sum(torch.outer(B[:, k], A[k]) for k in range(2))
    ref = 2.0 * U @ inner @ Vt
    x = layer_input(features=20)
    torch.testing.assert_close(f.delta_weight(layer.linear_weight()), ref, rtol=1e-10, atol=1e-12)
    out = layer(x)
    torch.testing.assert_close(out, x @ (layer.base.weight.detach() + ref).T + layer.base.bias.detach(),
                               rtol=1e-10, atol=1e-12)
    handle.merge()
    torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-12)


def test_nora_init_outer_svd_frozen_inner_principal_and_starts_as_base():
    x, _ = tiny_data()
    base = TinyNet()(x).logits
    model, handle = adapted("nora", rank=4, alpha=8, init="nora", nora_inner_rank=3)
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
    f = model.fc2.adapters["default"].form
    W0 = TinyNet().fc2.weight.detach()
    U, S, Vh = _svd(W0, 4)
    _same_subspace(f.U, U)
    _same_subspace(f.Vt.T, Vh.T)
    torch.testing.assert_close(f.delta_weight(W0), U[:, :3] * S[:3] @ Vh[:3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(model.fc2.base.weight.detach(), W0 - U[:, :3] * S[:3] @ Vh[:3], rtol=1e-8, atol=1e-10)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{l}.adapters.default.form.{p}" for l in ("fc1", "fc2") for p in ("A_inner", "B_inner")]
    assert sum(p.numel() for p in handle.trainable_parameters()) == 2 * (2 * 4 * 3)
    U0 = f.U.clone()
    train(model, handle, steps=5, lr=1e-2)
    assert torch.equal(f.U, U0)  # the outer pair stays frozen


def test_default_init_zero_update_outer_from_svd():
    x, _ = tiny_data()
    model, handle = adapted("nora", rank=4)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)
    f = model.fc1.adapters["default"].form
    _same_subspace(f.U, _svd(TinyNet().fc1.weight.detach(), 4)[0])
    assert f.rank == 4 and torch.count_nonzero(f.B_inner) == 0


def test_rank_mask_on_inner_activations():
    model, handle, layer = single_layer("nora", rank=4, nora_inner_rank=3)
    perturb(handle)
    f = _form(layer)
    mask = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64)
    x, y = layer_input(features=20), layer_input(features=24, seed=6)
    ref = y + f.scale * x @ (f.U @ f.B_inner.detach() @ torch.diag(mask) @ f.A_inner.detach() @ f.Vt).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-10, atol=1e-12)


def test_refusals():
    with pytest.raises(lorazoo.SpecError, match="nora_inner_rank"):
        lorazoo.AdapterSpec(form="nora", rank=4, nora_inner_rank=5)
    with pytest.raises(lorazoo.SpecError, match="nora_inner_rank"):
        lorazoo.AdapterSpec(form="nora", nora_inner_rank=-1)
    with pytest.raises(lorazoo.SpecError, match="form 'nora'"):
        lorazoo.AdapterSpec(form="lora", init="nora")
    with pytest.raises(lorazoo.SpecError, match="nora"):
        lorazoo.AdapterSpec(form="nora", init="pissa")


def test_conv_layer_starts_as_base_and_merges():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    base = model(x)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="nora", init="nora", rank=2, targets="all-conv"))
    torch.testing.assert_close(model(x), base, rtol=1e-8, atol=1e-10)
    perturb(handle)
    out = model(x)
    handle.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-10)
