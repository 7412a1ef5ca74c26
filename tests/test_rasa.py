"""RaSA (He et al. [49]; study Eq. 27): ΔW = [B_L B_S] D [A_L; A_S], A_S, B_S shared by the L layers of
a module type (k ranks from each), D diagonal per layer."""
import pytest
import torch

import lorazoo
from stacked import BLOCKS, SHAPES, TARGETS, Stacked, form_at, stacked
from tiny import layer_input, op_shapes, perturb, single_layer, train

TYPES = {"q": "layers_N_q_12x12", "up": "layers_N_up_12x20", "down": "layers_N_down_20x12"}


def _paths(kind):
    return [f"layers.{i}.{kind}" for i in range(BLOCKS)]


def _shared(model, kind, k=1):
    return model.layers[0].q.adapters["default"].shared[f"rasa_k{k}_{TYPES[kind]}"]


def _dense(f, bank, mask=None):
    """Eq. 27 written out: [B_L B_S] diag(D) [A_L; A_S]."""
    Bcat = torch.cat([f.B.detach(), bank.B.detach()], dim=1)
    Acat = torch.cat([f.A.detach(), bank.A.detach()], dim=0)
    d = f.D.detach() if mask is None else f.D.detach() * mask
    return Bcat @ torch.diag(d) @ Acat


def test_matches_dense_reference_on_every_layer():
    model, handle = stacked("rasa", rank=4, alpha=8)
    perturb(handle)
    for kind in TARGETS:
        bank = _shared(model, kind)
        fin, fout = SHAPES[kind]
        assert bank.A.shape == (1 * BLOCKS, fin) and bank.B.shape == (fout, 1 * BLOCKS)  # k·L ranks
        for path in _paths(kind):
            layer, f = model.get_submodule(path), form_at(model, path)
            assert f.A.shape == (3, fin) and f.D.shape == (3 + BLOCKS,)  # r - k local, hidden (r-k)+kL
            x = layer_input(features=fin)
            ref = x @ (layer.base.weight.detach() + _dense(f, bank)).T + layer.base.bias
            torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(f.delta_weight(layer.linear_weight()), _dense(f, bank), rtol=1e-6, atol=1e-12)


def test_init_as_the_authors_and_starts_as_base():
    """Local and shared B zero; D = 0.5·α/(r - k) on local ranks, 0.5·α/(k·L) on shared ones, α = s·r."""
    model, handle = stacked("rasa", rank=4, alpha=8, rasa_k=2)
    f = form_at(model, "layers.1.up")
    torch.testing.assert_close(f.D[:2], torch.full((2,), 0.5 * 8 / 2, dtype=torch.float64))
    torch.testing.assert_close(f.D[2:], torch.full((2 * BLOCKS,), 0.5 * 8 / (2 * BLOCKS), dtype=torch.float64))
    assert torch.count_nonzero(f.B) == 0 and torch.count_nonzero(f.bank.B) == 0 and f.bank.A.abs().sum() > 0
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, Stacked()(x).logits, rtol=0, atol=0)
    # rsLoRA's s = α/sqrt(r) enters through α = s·r in D's init
    _, h2 = stacked("rasa", rank=4, alpha=8, scale="rslora")
    torch.testing.assert_close(form_at(h2.model, "layers.0.q").D[:3],
                               torch.full((3,), 0.5 * (8 / 2) * 4 / 3, dtype=torch.float64))


def test_one_bank_per_module_type_stored_once():
    model, handle = stacked("rasa", rank=4)
    for kind in TARGETS:
        forms = [form_at(model, p) for p in _paths(kind)]
        assert all(f.bank is _shared(model, kind) for f in forms)
    assert len({id(form_at(model, f"layers.0.{k}").bank) for k in TARGETS}) == 3
    for sd, prefix in ((model.state_dict(), "layers.0.q.adapters.default.shared."), (handle.state_dict(), "layers.0.q.shared.")):
        shared = sorted(k for k in sd if ".shared." in k)
        assert shared == sorted(prefix + f"rasa_k1_{t}.{w}" for t in TYPES.values() for w in "AB")
    params = handle.trainable_parameters()
    assert len({id(p) for p in params}) == len(params)  # each shared tensor once
    assert all(any(p is q for q in params) for k in TARGETS for p in _shared(model, k).parameters())
    # the trainable count is a rank-r LoRA's plus the diagonals: sharing adds no parameters
    lora = sum(4 * (fi + fo) for fi, fo in SHAPES.values()) * BLOCKS
    assert handle.num_trainable() == lora + BLOCKS * len(TARGETS) * (3 + BLOCKS)


def test_shared_tensors_get_the_gradient_of_every_layer():
    """d/dB_S of Σ_l <G_l, ΔW_l X_l> = Σ_l G_l X_l^T A_S^T diag(D_S,l), summed over the L layers."""
    model, handle = stacked("rasa", rank=4)
    perturb(handle)
    bank = _shared(model, "up")
    loss, ref_B, ref_A = 0, torch.zeros_like(bank.B), torch.zeros_like(bank.A)
    for i, path in enumerate(_paths("up")):
        layer, f = model.get_submodule(path), form_at(model, path)
        X, G = layer_input(n=7, features=12, seed=i).T, layer_input(n=7, features=20, seed=10 + i).T
        loss = loss + (G.T * f(X.T, torch.zeros(7, 20, dtype=torch.float64), layer.linear_weight())).sum()
        Ds = torch.diag(f.D.detach()[3:])
        ref_B += G @ X.T @ bank.A.detach().T @ Ds
        ref_A += Ds @ bank.B.detach().T @ G @ X.T
    loss.backward()
    torch.testing.assert_close(bank.B.grad, ref_B, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(bank.A.grad, ref_A, rtol=1e-6, atol=1e-12)


def test_rank_exceeds_r_up_to_the_pooled_rank():
    """The paper's claim: effective rank (r - k) + L·k with the parameters of rank r."""
    model, handle = stacked("rasa", rank=4)
    perturb(handle)
    for kind in TARGETS:
        f = form_at(model, f"layers.2.{kind}")
        dW = f.delta_weight(None)
        assert torch.linalg.matrix_rank(dW) == 3 + BLOCKS > 4
    assert lorazoo.registry.FORMS.get("rasa").obj.rank_bound.startswith("min(r - k + L·k")


def test_k_equal_r_and_single_layer_types():
    model, handle = stacked("rasa", rank=2, rasa_k=2)
    f = form_at(model, "layers.0.q")
    assert f.A.shape == (0, 12) and f.D.shape == (2 * BLOCKS,)
    perturb(handle)
    assert torch.linalg.matrix_rank(f.delta_weight(None)) == 2 * BLOCKS
    # a layer alone in its type (TinyNet's fc1, fc2): the pool is its own k ranks
    _, handle, layer = single_layer("rasa", rank=3)
    f = layer.adapters["default"].form
    assert f.bank.A.shape == (1, 20) and f.D.shape == (3,)


def test_merge_unmerge_and_save_load(tmp_path):
    model, handle = stacked("rasa", rank=4)
    train(model, handle, steps=3, data=(layer_input(n=32, features=12), torch.arange(32) % 3))
    perturb(handle)
    x = layer_input(features=12)
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.unmerge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.save(tmp_path)
    fresh = Stacked()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(_shared(fresh, "down").B, _shared(model, "down").B, rtol=0, atol=0)
    assert form_at(fresh, "layers.2.down").bank is _shared(fresh, "down")
    assert loaded.num_trainable() == handle.num_trainable()


def test_training_moves_the_shared_pool():
    model, handle = stacked("rasa", rank=4)
    before = _shared(model, "q").B.detach().clone()
    x, y = layer_input(n=32, features=12), torch.arange(32) % 3
    losses = train(model, handle, steps=20, lr=2e-2, data=(x, y))
    assert losses[-1] < losses[0] and not torch.equal(_shared(model, "q").B, before)


def test_rank_mask_acts_on_the_pooled_hidden_dimension():
    model, handle = stacked("rasa", rank=4, rank_dropout=0.5)
    perturb(handle)
    layer, f = model.layers[1].up, form_at(model, "layers.1.up")
    assert f.rank == 3 + BLOCKS
    x, y = layer_input(features=12), layer_input(features=20, seed=5)
    mask = torch.tensor([2.0, 0, 2, 0, 2, 2], dtype=torch.float64)
    ref = y + x @ _dense(f, f.bank, mask).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=1e-12)
    model.train()
    model(x)  # rank dropout draws a mask of the hidden size


def test_options_and_combinations():
    for bad in (0, 1.5, "x"):
        with pytest.raises(lorazoo.SpecError, match="rasa_k"):
            lorazoo.AdapterSpec(form="rasa", rasa_k=bad)
    with pytest.raises(lorazoo.SpecError, match=r"rasa_k \(5\) must be at most rank \(4\)"):
        lorazoo.AdapterSpec(form="rasa", rank=4, rasa_k=5)
    with pytest.raises(lorazoo.SpecError, match="rasa"):
        lorazoo.AdapterSpec(form="rasa", init="pissa")  # no plain B·A factors to set
    # LoRA+: local and shared B learn ratio x faster, each tensor once
    model, handle = stacked("rasa", rank=4, optim="loraplus")
    groups = {g["name"]: g["params"] for g in handle.param_groups(1e-3)}
    fast = {id(p) for p in groups["B"]}
    assert id(_shared(model, "up").B) in fast and id(form_at(model, "layers.1.up").B) in fast
    assert id(_shared(model, "up").A) not in fast
    assert sum(len(v) for v in groups.values()) == len(handle.trainable_parameters())
    assert lorazoo.AdapterSpec.preset("rasa").options["rasa_k"] == 1  # study Sec. IV-C4


def test_forward_never_forms_the_update():
    model, handle, layer = single_layer("rasa", rank=3)
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None)
                       .sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes and f.D.grad is not None
    assert f.bank.A.grad is not None
