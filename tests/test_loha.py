"""LoHA (FedPara [43]; study Eq. 16): ΔW = (alpha/r)·(B1 A1) ⊙ (B2 A2), rank up to r², zero at init."""
import torch

from tiny import adapted, layer_input, op_shapes, perturb, single_layer


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def _dense(f, mask=None):
    """Eq. 16 in float64, element by element of the two products (mask: same diag on both ranks)."""
    m = torch.ones(f.rank, dtype=torch.float64) if mask is None else mask
    B1, A1, B2, A2 = (t.detach() for t in (f.B1, f.A1, f.B2, f.A2))
    return torch.einsum("or,r,ri->oi", B1, m, A1) * torch.einsum("or,r,ri->oi", B2, m, A2)


def test_matches_dense_reference():
    model, handle = adapted("loha", rank=3, alpha=6)
    perturb(handle)
    layer, f = model.fc2, _form(model)
    x = layer_input()
    ref = x @ (layer.base.weight.detach() + (6 / 3) * _dense(f)).T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)


def test_khatri_rao_factors_equal_the_hadamard_formula():
    model, handle = adapted("loha", rank=3)
    perturb(handle)
    f = _form(model, "fc1")
    B, A = f.khatri_rao()
    assert B.shape == (16, 9) and A.shape == (9, 12)
    torch.testing.assert_close(B @ A, _dense(f), rtol=1e-6, atol=1e-12)
    i, j = 2, 1  # column (i, j) -> i·r + j
    torch.testing.assert_close(B[:, i * 3 + j], f.B1[:, i] * f.B2[:, j])
    torch.testing.assert_close(A[i * 3 + j], f.A1[i] * f.A2[j])


def test_zero_update_at_init_and_it_can_learn():
    model, handle = adapted("loha", rank=3)
    f = _form(model)
    assert torch.count_nonzero(f.A2) == 0
    assert all(torch.count_nonzero(p) == p.numel() for p in (f.A1, f.B1, f.B2))
    assert torch.count_nonzero(f.delta_weight(model.fc2.linear_weight())) == 0
    model(layer_input(features=12)).logits.sum().backward()
    assert torch.count_nonzero(f.A2.grad) > 0  # the zero factor gets a gradient at once


def test_update_rank_exceeds_r_up_to_r_squared():
    model, handle = adapted("loha", rank=2)
    perturb(handle)
    f = _form(model)
    rank = torch.linalg.matrix_rank(f.delta_weight(model.fc2.linear_weight())).item()
    assert 2 < rank <= 4  # a rank-2 LoRA could not exceed 2 (study Eq. 6: r² bound)
    assert rank == 4  # generic random factors reach the bound


def test_rank_mask_acts_on_both_branches():
    model, handle = adapted("loha", rank=3, alpha=3)
    perturb(handle)
    layer, f = model.fc2, _form(model)
    x, y = layer_input(), layer_input(seed=5)
    mask = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64)
    ref = y + x @ (1.0 * _dense(f, mask)).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=0)


def test_forward_never_forms_the_update():
    model, handle, layer = single_layer("loha", rank=3)
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    y = torch.zeros(5, 24, dtype=torch.float64)
    shapes = op_shapes(lambda: f(x, y, layer.linear_weight(), None).sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes
    assert f.A2.grad is not None and x.grad is not None
    assert (24, 20) in op_shapes(lambda: f.delta_weight(layer.linear_weight()))  # the probe sees it
