"""DenseLoRA (Mu et al. [50]; study Eq. 33): encoder A_S and decoder B_S shared by the layers of a module
type, a dense r x r matrix M per layer; the authors' code puts GELU after encoder and decoder."""
import pytest
import torch
import torch.nn.functional as F

import lorazoo
from stacked import BLOCKS, SHAPES, TARGETS, Stacked, form_at, stacked
from tiny import TinyNet, layer_input, op_shapes, perturb, single_layer, train

TYPES = {"q": "layers_N_q_12x12", "up": "layers_N_up_12x20", "down": "layers_N_down_20x12"}


def _paths(kind):
    return [f"layers.{i}.{kind}" for i in range(BLOCKS)]


def _shared(model, kind, r=4):
    return model.layers[0].q.adapters["default"].shared[f"denselora_r{r}_{TYPES[kind]}"]


def _update(x, A, M, B, s, gelu):
    """The authors' forward, row-vector form: s·σ(σ(x A^T) M^T B^T), σ = GELU or identity."""
    act = F.gelu if gelu else (lambda t: t)
    return s * act(act(x @ A.T) @ M.T @ B.T)


@pytest.mark.parametrize("gelu", [True, False])
def test_matches_dense_reference_on_every_layer(gelu):
    kw = {} if gelu else {"denselora_activation": "identity"}
    model, handle = stacked("denselora", rank=4, alpha=6, **kw)
    perturb(handle)
    for kind in TARGETS:
        bank = _shared(model, kind)
        fin, fout = SHAPES[kind]
        assert bank.A.shape == (4, fin) and bank.B.shape == (fout, 4)
        for path in _paths(kind):
            layer, f = model.get_submodule(path), form_at(model, path)
            x = layer_input(features=fin)
            A, M, B = bank.A.detach(), f.M.detach(), bank.B.detach()
            ref = x @ layer.base.weight.detach().T + layer.base.bias + _update(x, A, M, B, 6 / 4, gelu)
            torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-12)
            if not gelu:  # Eq. 33 in (out, in) layout: s·B M A
                torch.testing.assert_close(f.delta_weight(None), (6 / 4) * B @ M @ A, rtol=1e-6, atol=1e-12)


def test_init_zero_update_and_kaiming():
    model, handle = stacked("denselora", rank=4)
    f = form_at(model, "layers.1.q")
    assert torch.count_nonzero(f.bank.B) == 0
    assert 0 < f.M.abs().max() <= 1 / 2 and 0 < f.bank.A.abs().max() <= 1 / 12 ** 0.5  # a = sqrt(5): 1/sqrt(fan_in)
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, Stacked()(x).logits, rtol=0, atol=0)


def test_gelu_is_not_mergeable_identity_merges_exactly():
    model, handle = stacked("denselora", rank=4)
    perturb(handle)
    with pytest.raises(lorazoo.NotMergeableError):
        handle.merge()
    with pytest.raises(lorazoo.NotMergeableError, match="identity"):
        form_at(model, "layers.0.q").delta_weight(None)
    assert not handle.merged
    model, handle = stacked("denselora", rank=4, denselora_activation="identity")
    perturb(handle)
    x = layer_input(features=12)
    out = model(x).logits
    before = model.layers[2].down.base.weight.detach().clone()
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.unmerge()
    torch.testing.assert_close(model.layers[2].down.base.weight, before, rtol=1e-6, atol=1e-12)


def test_one_bank_per_module_type_stored_once_dense_matrix_per_layer():
    model, handle = stacked("denselora", rank=4)
    for kind in TARGETS:
        forms = [form_at(model, p) for p in _paths(kind)]
        assert all(f.bank is _shared(model, kind) for f in forms)
        assert len({id(f.M) for f in forms}) == BLOCKS
    keys = sorted(k for k in handle.state_dict() if ".shared." in k)
    assert keys == sorted(f"layers.0.q.shared.denselora_r4_{t}.{w}" for t in TYPES.values() for w in "AB")
    params = handle.trainable_parameters()
    assert len({id(p) for p in params}) == len(params)
    shared = sum(4 * (fi + fo) for fi, fo in SHAPES.values())  # once per type, not per layer
    assert handle.num_trainable() == shared + BLOCKS * len(TARGETS) * 4 * 4


def test_shared_decoder_gets_the_gradient_of_every_layer():
    """Identity activation: d/dB_S of Σ_l <G_l, s B_S M_l A_S X_l> = s Σ_l G_l X_l^T A_S^T M_l^T."""
    model, handle = stacked("denselora", rank=4, alpha=8, denselora_activation="identity")
    perturb(handle)
    bank = _shared(model, "down")
    loss, ref = 0, torch.zeros_like(bank.B)
    for i, path in enumerate(_paths("down")):
        layer, f = model.get_submodule(path), form_at(model, path)
        X, G = layer_input(n=7, features=20, seed=i).T, layer_input(n=7, features=12, seed=10 + i).T
        loss = loss + (G.T * f(X.T, torch.zeros(7, 12, dtype=torch.float64), layer.linear_weight())).sum()
        ref += 2.0 * G @ X.T @ bank.A.detach().T @ f.M.detach().T
    loss.backward()
    torch.testing.assert_close(bank.B.grad, ref, rtol=1e-6, atol=1e-12)


def test_save_load_restores_the_shared_pairs(tmp_path):
    model, handle = stacked("denselora", rank=4)
    train(model, handle, steps=3, data=(layer_input(n=32, features=12), torch.arange(32) % 3))
    perturb(handle)
    x = layer_input(features=12)
    out = model(x).logits
    handle.save(tmp_path)
    fresh = Stacked()
    lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(_shared(fresh, "up").A, _shared(model, "up").A, rtol=0, atol=0)
    assert form_at(fresh, "layers.1.up").bank is _shared(fresh, "up")


def test_rank_mask_and_rank_beyond_the_layer_shape():
    model, handle = stacked("denselora", rank=4, alpha=4)
    perturb(handle)
    layer, f = model.layers[0].up, form_at(model, "layers.0.up")
    x, y = layer_input(features=12), layer_input(features=20, seed=5)
    mask = torch.tensor([0.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    A, M, B = f.bank.A.detach(), f.M.detach(), f.bank.B.detach()
    ref = y + F.gelu(F.gelu(x @ A.T) * mask @ M.T @ B.T)
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=1e-12)
    # the study's rank 192 on layers of 12 and 16 features: allowed, as the shared pair is not per layer
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec.preset("denselora", targets=["fc1", "fc2"]))
    assert model.fc1.adapters["default"].form.M.shape == (192, 192)


def test_options_preset_and_combinations():
    with pytest.raises(lorazoo.SpecError, match="denselora_activation"):
        lorazoo.AdapterSpec(form="denselora", denselora_activation="relu")
    with pytest.raises(lorazoo.SpecError, match="denselora"):
        lorazoo.AdapterSpec(form="denselora", init="pissa")
    spec = lorazoo.AdapterSpec.preset("denselora")  # study Sec. IV-C4: rank 24·8 = 192, α = 48·8 = 384
    assert spec.rank == 192 and spec.scale == "constant" and spec.alpha == 2  # s = α/r = 2 at any rank
    model, handle = stacked("denselora", rank=4, optim="loraplus", scale="rslora")
    assert form_at(model, "layers.0.q").scale == 16 / 2
    fast = {id(p) for g in handle.param_groups(1e-3) if g["name"] == "B" for p in g["params"]}
    assert id(_shared(model, "q").B) in fast and id(_shared(model, "q").A) not in fast


def test_forward_never_forms_the_update():
    model, handle, layer = single_layer("denselora", rank=3, denselora_activation="identity")
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None)
                       .sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes and f.M.grad is not None
    assert f.bank.B.grad is not None


def test_gelu_decoder_recomputes_instead_of_keeping_tokens_x_out():
    from lorazoo.forms.denselora import GeluDecode

    h = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GeluDecode.apply, (h, B))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        GeluDecode.apply(h, B)
    assert sorted(kept) == [(2, 5, 3), (7, 3)]  # h and B only, not the (2, 5, 7) pre-activation
