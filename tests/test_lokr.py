"""LoKr (LyCORIS [44]; study Eq. 18-21): ΔW = (alpha/r)·(P ⊗ C), C = B A (or dense at full rank)."""
import pytest
import torch

import lorazoo
from lorazoo.forms.lokr import factorization
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, single_layer


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def _kron(P, C):
    """P ⊗ C by its definition: entry (a·p + b, c·q + d) = P[a, c]·C[b, d], C of shape (p, q)."""
    (m, n), (p, q) = P.shape, C.shape
    out = torch.zeros(m * p, n * q, dtype=torch.float64)
    for a in range(m):
        for c in range(n):
            out[a * p:(a + 1) * p, c * q:(c + 1) * q] = P[a, c] * C
    return out


def _c(f, mask=None):
    """C (with the rank mask on its rank dim) from the tensors, as Eq. 20-21 define it."""
    m = torch.ones(f.rank, dtype=torch.float64) if mask is None else mask
    if "C" in f._parameters:
        C = f.C.detach()
        return C * m if C.shape[1] == f.rank else m[:, None] * C
    return f.B.detach() @ torch.diag(m) @ f.A.detach()


def test_factorization_matches_lycoris():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in (1, 7, 12, 16, 127, 128, 360, 768, 1000, 4096, 11008):
        assert factorization(dim) == peft_factorization(dim, -1)
    for dim, factor in ((128, 4), (512, 4), (360, 8), (250, 4), (1000, 16)):
        assert factorization(dim, factor) == peft_factorization(dim, factor)
    assert factorization(128, 64) == (2, 64)  # LyCORIS sorts: the small factor comes first


def test_peft_file_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from lorazoo.peft_format import peft_factorization as ours

    for dim in (1, 7, 12, 128, 768, 1000, 11008):
        for factor in (-1, 4, 8, 16, 64, 100):
            assert ours(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    assert ours(128, 64) == (64, 2)  # PEFT keeps (factor, dimension/factor) unsorted


@pytest.mark.parametrize("rank,factor", [(2, -1), (4, -1), (5, 2), (6, 2)])
def test_matches_dense_reference(rank, factor):
    model, handle = adapted("lokr", rank=rank, alpha=6, lokr_factor=factor)
    perturb(handle)
    for name, fin in (("fc1", 12), ("fc2", 16)):
        layer, f = getattr(model, name), _form(model, name)
        x = layer_input(features=fin)
        dW = (6 / rank) * _kron(f.P.detach(), _c(f))
        ref = x @ (layer.base.weight.detach() + dW).T + layer.base.bias.detach()
        torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)


def test_shapes_factor_and_dense_mode():
    model, _ = adapted("lokr", rank=2)
    f1, f2 = _form(model, "fc1"), _form(model, "fc2")
    assert f1.P.shape == (4, 3) and (f1.B.shape, f1.A.shape) == ((4, 2), (2, 4))  # 16 = 4·4, 12 = 3·4
    assert f2.P.shape == (4, 4) and "C" not in f2._parameters
    model, _ = adapted("lokr", rank=4)  # r = full rank of C (4 x 4): one dense C
    assert _form(model).C.shape == (4, 4) and "B" not in _form(model)._parameters
    model, _ = adapted("lokr", rank=3, lokr_factor=2)  # 16 = 2·8, 12 = 2·6
    assert _form(model, "fc1").P.shape == (2, 2) and _form(model, "fc1").A.shape == (3, 6)


@pytest.mark.parametrize("rank", [2, 4])
def test_zero_update_at_init(rank):
    model, handle = adapted("lokr", rank=rank)
    f = _form(model)
    zero = f.C if rank == 4 else f.B
    assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(f.P) == f.P.numel()
    assert torch.count_nonzero(f.delta_weight(model.fc2.linear_weight())) == 0


def test_update_rank_is_product_of_factor_ranks():
    model, handle = adapted("lokr", rank=2)
    perturb(handle)
    f = _form(model)
    rank = torch.linalg.matrix_rank(f.delta_weight(model.fc2.linear_weight())).item()
    rp, rc = torch.linalg.matrix_rank(f.P).item(), torch.linalg.matrix_rank(f.B @ f.A).item()
    assert (rp, rc) == (4, 2) and rank == rp * rc == 8  # well beyond r = 2


def test_rank_limit_follows_the_factor_and_refuses_before_changing_the_model():
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError, match="at most 4"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="lokr", rank=5, targets=["fc1", "fc2"]))
    assert type(model.fc1) is torch.nn.Linear and all(p.requires_grad for p in model.parameters())
    lorazoo.adapt(model, lorazoo.AdapterSpec(form="lokr", rank=6, lokr_factor=2, targets=["fc1", "fc2"]))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_factor_refused(bad):
    with pytest.raises(lorazoo.SpecError, match="lokr_factor"):
        lorazoo.AdapterSpec(form="lokr", lokr_factor=bad)


@pytest.mark.parametrize("rank,factor", [(2, -1), (4, -1), (5, 2)])
def test_rank_mask_on_c_rank_dim(rank, factor):
    model, handle = adapted("lokr", rank=rank, alpha=rank, lokr_factor=factor)
    perturb(handle)
    layer, f = model.fc1, _form(model, "fc1")
    x, y = layer_input(features=12), layer_input(seed=5)
    mask = torch.zeros(rank, dtype=torch.float64)
    mask[::2] = 2.0
    ref = y + x @ _kron(f.P.detach(), _c(f, mask)).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rank", [2, 4])
def test_forward_never_forms_the_kronecker_product(rank):
    model, handle, layer = single_layer("lokr", rank=rank)  # 20 = 4·5, 24 = 4·6
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    y = torch.zeros(5, 24, dtype=torch.float64)
    shapes = op_shapes(lambda: f(x, y, layer.linear_weight(), None).sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes
    assert f.P.grad is not None and x.grad is not None
    assert (24, 20) in op_shapes(lambda: f.delta_weight(layer.linear_weight()))


def test_dense_c_with_rank_on_its_output_side():
    model, handle, layer = single_layer("lokr", in_features=24, out_features=20, rank=5, alpha=10)
    perturb(handle)
    f = layer.adapters["default"].form
    assert f.C.shape == (5, 6)  # 20 = 4·5, 24 = 4·6: r = 5 = out side of C
    x, y = layer_input(features=24), layer_input(features=20, seed=5)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight.detach() + 2 * _kron(f.P.detach(), _c(f))).T
                               + layer.base.bias.detach(), rtol=1e-6, atol=0)
    mask = torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0], dtype=torch.float64)
    ref = y + 2 * x @ _kron(f.P.detach(), _c(f, mask)).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=0)
