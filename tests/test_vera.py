"""VeRA (Kopiczko et al. [48]; study Eq. 24-26): ΔW = s·Λ_b B Λ_d A, A and B frozen, random, shared."""
import math

import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, single_layer, tiny_data


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def _shared(model):
    return model.fc1.adapters["default"].shared["vera_r4"]


def _dense(f, A, B, mask=None):
    """Eq. 26 in torch's (out, in) layout: diag(b) B[:out, :] diag(d) A[:, :in]."""
    m = torch.ones(f.rank, dtype=torch.float64) if mask is None else mask
    Bs, As = B[: f.out_features].detach(), A[:, : f.in_features].detach()
    return torch.diag(f.b.detach()) @ Bs @ torch.diag(f.d.detach() * m) @ As


def test_matches_dense_reference_on_layers_of_different_shapes():
    model, handle = adapted("vera", rank=4, alpha=6)
    perturb(handle)
    bank = _shared(model)
    assert bank.A.shape == (4, 16) and bank.B.shape == (16, 4)  # max_in = 16, max_out = 16
    for name, fin in (("fc1", 12), ("fc2", 16)):
        layer, f = getattr(model, name), _form(model, name)
        x = layer_input(features=fin)
        ref = x @ (layer.base.weight.detach() + (6 / 4) * _dense(f, bank.A, bank.B)).T + layer.base.bias
        torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)


def test_init_zero_update_and_trainable_vectors_only():
    model, handle = adapted("vera", rank=4, vera_d_init=0.25)
    f = _form(model)
    assert torch.count_nonzero(f.b) == 0 and torch.all(f.d == 0.25)
    assert torch.count_nonzero(f.delta_weight(model.fc2.linear_weight())) == 0
    assert handle.num_trainable() == 2 * 4 + 16 + 16  # d (r) and b (out) per layer
    assert not any(t.requires_grad for t in _shared(model).buffers())
    model(layer_input(features=12)).logits.sum().backward()
    assert torch.count_nonzero(f.b.grad) > 0  # b learns at once; d follows


def test_bank_is_kaiming_uniform_from_the_seed():
    """He-uniform with gain sqrt(2), as PEFT's vera._kaiming_init: U(-sqrt(6/fan_in), sqrt(6/fan_in)),
    fan_in = max_in (16) for A (r, max_in) and r (4) for B (max_out, r); A then B from one generator
    seeded with the spec's seed."""
    bank = _shared(adapted("vera", rank=4)[0])
    bound_A, bound_B = math.sqrt(6 / 16), math.sqrt(6 / 4)
    assert bank.A.abs().max() <= bound_A and bank.B.abs().max() <= bound_B
    assert bank.A.abs().max() > 0.9 * bound_A and bank.B.abs().max() > 0.9 * bound_B  # not 1/sqrt(fan_in)
    g = torch.Generator().manual_seed(0)  # the spec's default seed
    A = torch.empty(4, 16).uniform_(-bound_A, bound_A, generator=g)
    B = torch.empty(16, 4).uniform_(-bound_B, bound_B, generator=g)
    torch.testing.assert_close(bank.A, A.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(bank.B, B.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(_shared(adapted("vera", rank=4)[0]).A, bank.A, rtol=0, atol=0)
    assert not torch.equal(_shared(adapted("vera", rank=4, seed=1)[0]).A, bank.A)


def test_one_bank_shared_by_every_layer_and_stored_once():
    model, handle = adapted("vera", rank=4)
    f1, f2 = _form(model, "fc1"), _form(model, "fc2")
    assert f1.bank is f2.bank is _shared(model)
    B1, A1 = f1.sliced()
    B2, A2 = f2.sliced()
    assert A1.data_ptr() == A2.data_ptr() and B1.data_ptr() == B2.data_ptr()
    for sd, prefix in ((model.state_dict(), "fc1.adapters.default."), (handle.state_dict(), "fc1.")):
        bank_keys = [k for k in sd if k.rsplit(".", 1)[-1] in ("A", "B")]
        assert sorted(bank_keys) == [prefix + "shared.vera_r4.A", prefix + "shared.vera_r4.B"]
    assert sum(1 for _ in model.modules() if isinstance(_, type(f1.bank))) == 1


def test_save_load_restores_the_bank(tmp_path):
    model, handle = adapted("vera", rank=4)
    perturb(handle)
    with torch.no_grad():
        _shared(model).A.mul_(-1.5)  # not what the seed would regenerate
    x, _ = tiny_data()
    out = model(x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(_shared(fresh).A, _shared(model).A, rtol=0, atol=0)
    assert _form(fresh, "fc2").bank is _shared(fresh)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)


def test_rank_may_exceed_the_layer_shape():
    model, handle = adapted("vera", rank=40)  # > min(in, out) of both layers
    perturb(handle)
    dW = _form(model, "fc1").delta_weight(model.fc1.linear_weight())
    assert dW.shape == (16, 12) and torch.linalg.matrix_rank(dW) == 12  # min(r, in, out)


def test_rank_mask_and_bad_d_init():
    model, handle = adapted("vera", rank=4, alpha=4)
    perturb(handle)
    layer, f, bank = model.fc1, _form(model, "fc1"), _shared(model)
    x, y = layer_input(features=12), layer_input(seed=5)
    mask = torch.tensor([0.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    ref = y + x @ _dense(f, bank.A, bank.B, mask).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=0)
    for bad in (0, -0.1, "x"):
        with pytest.raises(lorazoo.SpecError, match="vera_d_init"):
            lorazoo.AdapterSpec(form="vera", vera_d_init=bad)


def test_forward_never_forms_the_update():
    model, handle, layer = single_layer("vera", rank=3)
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None)
                       .sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes and f.d.grad is not None
    assert (24, 20) in op_shapes(lambda: f.delta_weight(layer.linear_weight()))


def test_rank_is_bounded_before_anything_changes():
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError, match="allows at most 256"):  # 16 x max(12, 16) on fc1
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="vera", rank=10**9, targets=["fc1", "fc2"]))
    assert not lorazoo.handles_of(model) and type(model.fc1).__name__ == "Linear"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    adapted("vera", rank=64)  # past min(in, out) but within the bound: allowed
