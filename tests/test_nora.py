"""NoRA (Lin et al. 2024 [79]; authors' NoRALinear_C): ΔW = s·(U_R S_R) B_i A_i V_Rᵀ, the outer pair the
frozen top-R singular triplets of W0 (R = floor(0.8 min(in, out))), the inner LoRA (rank r) trainable."""
import math

import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, perturb, single_layer, tiny_data, train


def _form(layer):
    return layer.adapters["default"].form


def _svd(W, R):
    U, S, Vh = torch.linalg.svd(W)
    return U[:, :R], S[:R], Vh[:R]


def _align(f, W, R):
    """The reference outer pair with each singular pair's sign matched to the form's (a joint flip
    of u_k and v_k leaves W0 unchanged)."""
    U, S, Vh = _svd(W, R)
    US = U * S
    sign = torch.sign((US * f.U).sum(0))
    return US * sign, Vh * sign[:, None]


def test_dense_reference_after_perturbation_and_merge():
    model, handle, layer = single_layer("nora", rank=3, alpha=6)  # in 20, out 24: R = floor(0.8·20) = 16
    f = _form(layer)
    W0 = layer.base.weight.detach().clone()
    perturb(handle)
    US, Vh = _align(f, W0, 16)
    B, A = f.B_inner.detach(), f.A_inner.detach()
    inner = sum(torch.outer(B[:, k], A[k]) for k in range(3))  # B_i A_i as rank-one terms
    ref = 2.0 * US @ inner @ Vh
    x = layer_input(features=20)
    torch.testing.assert_close(f.delta_weight(layer.linear_weight()), ref, rtol=1e-9, atol=1e-11)
    out = layer(x)
    torch.testing.assert_close(out, x @ (W0 + ref).T + layer.base.bias.detach(), rtol=1e-9, atol=1e-11)
    handle.merge()
    torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-12)
    handle.unmerge()
    torch.testing.assert_close(layer.base.weight.detach(), W0, rtol=1e-12, atol=1e-12)


def test_outer_rank_rules():
    for opts, R in (({}, 16), ({"nora_outer_ratio": 0.5}, 10), ({"nora_outer_rank": 5}, 5),
                    ({"nora_outer_ratio": 0.05}, 3)):  # floor(0.05·20) = 1, raised to the inner rank 3
        f = _form(single_layer("nora", rank=3, **opts)[2])
        assert f.outer_rank == R and f.U.shape == (24, R) and f.Vt.shape == (R, 20)
        assert f.A_inner.shape == (3, R) and f.B_inner.shape == (R, 3)


def test_init_outer_svd_frozen_zero_update_base_untouched():
    x, _ = tiny_data()
    base = TinyNet()(x).logits
    model, handle = adapted("nora", rank=4, alpha=8, init="nora")
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
    f = model.fc2.adapters["default"].form
    W0 = TinyNet().fc2.weight.detach()
    R = math.floor(0.8 * 16)
    US, Vh = _align(f, W0, R)
    torch.testing.assert_close(f.U, US, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f.Vt, Vh, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(model.fc2.base.weight.detach(), W0, rtol=0, atol=0)  # no base shift
    assert torch.count_nonzero(f.B_inner) == 0 and torch.count_nonzero(f.A_inner) > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{l}.adapters.default.form.{p}" for l in ("fc1", "fc2") for p in ("A_inner", "B_inner")]
    R1 = math.floor(0.8 * 12)  # fc1: 12 -> 16
    assert sum(p.numel() for p in handle.trainable_parameters()) == 2 * 4 * (R1 + R)
    U0, V0 = f.U.clone(), f.Vt.clone()
    losses = train(model, handle, steps=10, lr=1e-2)
    assert losses[-1] < losses[0]
    assert torch.equal(f.U, U0) and torch.equal(f.Vt, V0)  # the outer pair stays frozen
    assert torch.count_nonzero(f.B_inner) > 0


def test_default_init_equals_nora_init():
    _, h1 = adapted("nora", rank=4)
    _, h2 = adapted("nora", rank=4, init="nora")
    assert h1.state_dict().keys() == h2.state_dict().keys()
    for (n1, t1), (n2, t2) in zip(sorted(h1.state_dict().items()), sorted(h2.state_dict().items())):
        assert n1 == n2
        torch.testing.assert_close(t1, t2, rtol=0, atol=0)


def test_rank_mask_on_inner_activations():
    model, handle, layer = single_layer("nora", rank=3)
    perturb(handle)
    f = _form(layer)
    mask = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64)
    x, y = layer_input(features=20), layer_input(features=24, seed=6)
    ref = y + f.scale * x @ (f.U @ f.B_inner.detach() @ torch.diag(mask) @ f.A_inner.detach() @ f.Vt).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-10, atol=1e-12)


def test_update_factors_reproduce_delta():
    model, handle, layer = single_layer("nora", rank=3)
    perturb(handle)
    f = _form(layer)
    B, A = f.update_factors(layer.linear_weight())
    assert B.shape == (24, 3) and A.shape == (3, 20)
    torch.testing.assert_close(B @ A, f.delta_weight(layer.linear_weight()), rtol=1e-10, atol=1e-12)


def test_refusals():
    with pytest.raises(lorazoo.SpecError, match="nora_outer_rank"):
        lorazoo.AdapterSpec(form="nora", rank=4, nora_outer_rank=3)
    with pytest.raises(lorazoo.SpecError, match="nora_outer_rank"):
        lorazoo.AdapterSpec(form="nora", nora_outer_rank=-1)
    with pytest.raises(lorazoo.SpecError, match="nora_outer_ratio"):
        lorazoo.AdapterSpec(form="nora", nora_outer_ratio=0.0)
    with pytest.raises(lorazoo.SpecError, match="nora_outer_ratio"):
        lorazoo.AdapterSpec(form="nora", nora_outer_ratio=1.5)
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
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    perturb(handle)
    out = model(x)
    handle.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-10)
