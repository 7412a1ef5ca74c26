"""RandLoRA (Albert et al. [23]; study Eq. 31-32): ΔW = (s/√n) Σ_i B_i Λ_i A Γ_i, n = ceil(min(d, U)/b),
A and B_i shared, frozen, random; Λ_i (b), Γ_i (min(in, out)) trainable diagonals."""
import math

import pytest
import torch

import lorazoo
from lorazoo.forms.randlora import ScaledBasis
from stacked import BLOCKS, SHAPES, TARGETS, Stacked, form_at, stacked
from tiny import layer_input, op_shapes, perturb, single_layer, train


def _bank(model, r=3):
    return model.layers[0].q.adapters["default"].shared[f"randlora_r{r}"]


def _dense(f, bank, s):
    """Eq. 32 term by term, on the layer's smaller side m: (s/√n) Σ_i B_i diag(λ_i) A diag(γ_i),
    transposed when the output is the smaller side."""
    m, M = min(f.in_features, f.out_features), max(f.in_features, f.out_features)
    n = math.ceil(m / f.rank) if not f.bound else math.ceil(min(m, f.bound) / f.rank)
    A = bank.A[:, :m].detach()
    total = torch.zeros(M, m, dtype=torch.float64)
    for i in range(n):
        Bi = bank.B[:M, i, :].detach()
        total += Bi @ torch.diag(f.lam[i].detach()) @ A @ torch.diag(f.gam[i].detach())
    dW = s / math.sqrt(n) * total
    return dW if f.in_features <= f.out_features else dW.T


def test_matches_dense_reference_on_both_orientations():
    model, handle = stacked("randlora", rank=3, alpha=6)  # s = α/r = 2: the authors' alpha/r/sqrt(n)
    perturb(handle)
    bank = _bank(model)
    assert bank.A.shape == (3, 20) and bank.B.shape == (20, 7, 3)  # D_min = D_max = 20, n = ceil(20/3)
    for kind in TARGETS:  # q square, up in < out, down out < in (transposed)
        for i in range(BLOCKS):
            layer, f = model.layers[i].get_submodule(kind), form_at(model, f"layers.{i}.{kind}")
            fin, fout = SHAPES[kind]
            assert f.n == 4 and f.lam.shape == (4, 3) and f.gam.shape == (4, 12)
            x = layer_input(features=fin)
            ref = x @ (layer.base.weight.detach() + _dense(f, bank, 2.0)).T + layer.base.bias
            torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(f.delta_weight(None), _dense(f, bank, 2.0), rtol=1e-6, atol=1e-12)


def test_update_reaches_full_rank_from_rank_b_terms():
    """The paper's claim: each term B_i Λ_i A Γ_i has rank <= b, their sum has rank min(in, out)."""
    model, handle = stacked("randlora", rank=3)
    perturb(handle)
    for kind in TARGETS:
        f = form_at(model, f"layers.1.{kind}")
        assert torch.linalg.matrix_rank(f.delta_weight(None)) == 12 == min(SHAPES[kind])
        bank = f.bank
        term = bank.B[:20, 0, :] @ torch.diag(f.lam[0]) @ bank.A[:, :12] @ torch.diag(f.gam[0])
        assert torch.linalg.matrix_rank(term.detach()) <= 3
    _, handle, layer = single_layer("randlora", rank=5)  # 20 -> 24: n = 4 bases of rank 5
    perturb(handle)
    assert torch.linalg.matrix_rank(layer.adapters["default"].form.delta_weight(None)) == 20


def test_bound_U_caps_the_number_of_bases():
    """Eq. 31 with U = 6 < min(in, out) = 12: n = ceil(6/3) = 2 bases, rank n·b = 6."""
    model, handle = stacked("randlora", rank=3, randlora_bound=6)
    perturb(handle)
    f = form_at(model, "layers.0.up")
    assert f.n == 2 and _bank(model).B.shape == (20, 2, 3)
    assert torch.linalg.matrix_rank(f.delta_weight(None)) == 6
    torch.testing.assert_close(f.delta_weight(None), _dense(f, f.bank, 16 / 3), rtol=1e-6, atol=1e-12)
    spec = lorazoo.AdapterSpec.preset("randlora")  # study Sec. IV-C4: bases of rank 32, U = 1024, 2/√n
    assert spec.rank == 32 and spec.options["randlora_bound"] == 1024
    assert spec.scale == "constant" and spec.alpha == 2


def test_init_zero_update_and_trainable_diagonals_only():
    model, handle = stacked("randlora", rank=3)
    f = form_at(model, "layers.2.down")
    assert torch.count_nonzero(f.lam) == 0  # λ = 0, γ = 1/max(in, out)
    torch.testing.assert_close(f.gam, torch.full((4, 12), 1 / 20, dtype=torch.float64), rtol=1e-6, atol=0)
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, Stacked()(x).logits, rtol=0, atol=0)
    assert handle.num_trainable() == BLOCKS * len(TARGETS) * 4 * (3 + 12)  # n·(b + m) per layer
    assert not any(t.requires_grad for t in _bank(model).buffers())
    model(x).logits.sum().backward()
    assert torch.count_nonzero(f.lam.grad) > 0


def test_bank_random_unit_std_from_the_seed_stored_once():
    model, handle = stacked("randlora", rank=3)
    bank = _bank(model)
    for t in (bank.A, bank.B):
        torch.testing.assert_close(t.std(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)
    assert all(form_at(model, f"layers.{i}.{k}").bank is bank for i in range(BLOCKS) for k in TARGETS)
    keys = sorted(k for k in handle.state_dict() if ".shared." in k)
    assert keys == ["layers.0.q.shared.randlora_r3.A", "layers.0.q.shared.randlora_r3.B"]
    assert sum(1 for m in model.modules() if isinstance(m, type(bank))) == 1
    torch.testing.assert_close(_bank(stacked("randlora", rank=3)[0]).B, bank.B, rtol=0, atol=0)
    assert not torch.equal(_bank(stacked("randlora", rank=3, seed=1)[0]).A, bank.A)


def test_scaled_basis_gradient():
    A = torch.randn(3, 5, dtype=torch.float64)
    lam = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, g: ScaledBasis.apply(A, l, g), (lam, gam))


def test_merge_unmerge_save_load(tmp_path):
    model, handle = stacked("randlora", rank=3)
    train(model, handle, steps=3, data=(layer_input(n=32, features=12), torch.arange(32) % 3))
    perturb(handle)
    with torch.no_grad():
        _bank(model).B.mul_(-1.5)  # not what the seed would regenerate
    x = layer_input(features=12)
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.unmerge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.save(tmp_path)
    fresh = Stacked()
    lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(_bank(fresh).B, _bank(model).B, rtol=0, atol=0)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)


def test_options_and_combinations():
    for bad in (-1, 1.5, "x"):
        with pytest.raises(lorazoo.SpecError, match="randlora_bound"):
            lorazoo.AdapterSpec(form="randlora", randlora_bound=bad)
    with pytest.raises(lorazoo.SpecError, match="rank_dropout.*randlora"):
        lorazoo.AdapterSpec(form="randlora", rank_dropout=0.1)
    with pytest.raises(lorazoo.SpecError, match="randlora"):
        lorazoo.AdapterSpec(form="randlora", init="pissa")
    model, handle = stacked("randlora", rank=3, optim="loraplus", scale="rslora")
    f = form_at(model, "layers.0.q")
    assert f.scale == 16 / math.sqrt(3)
    fast = {id(p) for g in handle.param_groups(1e-3) if g["name"] == "B" for p in g["params"]}
    assert id(f.lam) in fast and id(f.gam) not in fast


def test_forward_never_forms_the_update_nor_per_token_bases():
    model, handle, layer = single_layer("randlora", rank=3)  # 20 -> 24: n = 7, S is (21, 20)
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None)
                       .sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes
    assert max(math.prod(s) for s in shapes) <= 24 * 21  # nothing of tokens x n x in
    assert f.lam.grad is not None and f.gam.grad is not None


@pytest.mark.parametrize("input_side", [True, False])
def test_fused_delta_gradient_and_saved_tensors(input_side):
    """RandLoraDelta's hand-written backward against autograd's, and it keeps no (n·b, m) basis."""
    from lorazoo.forms.randlora import RandLoraDelta

    g = torch.Generator().manual_seed(0)
    m, M, n, b = 5, 7, 2, 3
    x = torch.randn(2, 4, m if input_side else M, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(b, m, generator=g, dtype=torch.float64)
    lam = torch.randn(n, b, generator=g, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(n, m, generator=g, dtype=torch.float64, requires_grad=True)
    Bf = torch.randn(M, n * b, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: RandLoraDelta.apply(t[0], A, t[1], t[2], Bf, input_side), (x, lam, gam))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        RandLoraDelta.apply(x, A, lam, gam, Bf, input_side)
    assert (n * b, m) not in kept and (n, b, m) not in kept
