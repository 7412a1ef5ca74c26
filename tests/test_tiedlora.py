"""Tied-LoRA (Renduchintala et al. [53]): ΔW = s·Λ_v B Λ_u A, A and B tied across layers, u, v per layer,
a chosen subset of A, B, u, v trained."""
import pytest
import torch
from safetensors.torch import load_file

import lorazoo
from stacked import BLOCKS, SHAPES, TARGETS, Stacked, form_at, stacked
from tiny import TinyNet, layer_input, op_shapes, perturb, train

TYPES = {"q": "layers_N_q_12x12", "up": "layers_N_up_12x20", "down": "layers_N_down_20x12"}
VARIANTS = ["ABuv", "ABv", "Buv", "uv", "v", "u", "A", "B", "Av"]


def _bank(model, kind, train="ABuv", r=4):
    return model.layers[0].q.adapters["default"].shared[f"tiedlora_{''.join(sorted(train))}_r{r}_{TYPES[kind]}"]


def _dense(f, bank, mask=None):
    """diag(v) B diag(u ⊙ m) A, straight from the tensors."""
    u = f.u.detach() * (1 if mask is None else mask)
    return torch.diag(f.v.detach()) @ bank.B.detach() @ torch.diag(u) @ bank.A.detach()


def _perturb_all(model):
    """Move every tensor of the adapter (trainable or frozen) off its init."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("train", ["ABuv", "uv", "A"])
def test_matches_dense_reference(train):
    model, handle = stacked("tiedlora", rank=4, alpha=6, tiedlora_train=train)
    _perturb_all(model)
    for i in range(BLOCKS):
        for kind in TARGETS:
            path = f"layers.{i}.{kind}"
            layer, f = model.get_submodule(path), form_at(model, path)
            dW = 6 / 4 * _dense(f, _bank(model, kind, train))
            x = layer_input(features=SHAPES[kind][0])
            ref = x @ (layer.base.weight.detach() + dW).T + layer.base.bias
            torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(f.delta_weight(None), dW, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("train", VARIANTS)
def test_every_variant_starts_as_base_and_trains_exactly_its_tensors(train):
    model, handle = stacked("tiedlora", rank=4, tiedlora_train=train)
    x = layer_input(n=32, features=12)
    torch.testing.assert_close(model(x).logits, Stacked()(x).logits, rtol=0, atol=0)
    bank, f = _bank(model, "up", train), form_at(model, "layers.1.up")
    tensors = {"A": bank.A, "B": bank.B, "u": f.u, "v": f.v}
    assert {k for k, t in tensors.items() if t.requires_grad} == set(train)
    # the paper's parameter count for the variant: tied factors once per type, vectors per layer
    count = sum(("A" in train) * 4 * fi + ("B" in train) * 4 * fo
                + BLOCKS * (("u" in train) * 4 + ("v" in train) * fo) for fi, fo in SHAPES.values())
    assert handle.num_trainable() == count
    # the tensor that starts at zero gets a gradient at once, so training moves off the base
    before = {k: t.detach().clone() for k, t in tensors.items()}
    losses = train_(model, handle, x)
    assert losses[-1] < losses[0]
    for k, t in tensors.items():
        assert torch.equal(t, before[k]) == (k not in train), k


def train_(model, handle, x):
    return train(model, handle, steps=15, lr=2e-2, data=(x, torch.arange(len(x)) % 3))


def test_init_rules():
    """LoRA's (B = 0, u = v = 1) when B trains; VeRA's (v = 0) when only vectors and A train."""
    model, _ = stacked("tiedlora", rank=4)
    bank, f = _bank(model, "up"), form_at(model, "layers.2.up")
    assert torch.count_nonzero(bank.B) == 0 and torch.all(f.u == 1) and torch.all(f.v == 1)
    assert 0.5 / 12 ** 0.5 < bank.A.abs().max() <= 1 / 12 ** 0.5  # Kaiming-uniform a = sqrt(5)
    model, _ = stacked("tiedlora", rank=4, tiedlora_train="uv")
    bank, f = _bank(model, "up", "uv"), form_at(model, "layers.2.up")
    assert torch.count_nonzero(bank.B) == bank.B.numel() and torch.all(f.v == 0) and torch.all(f.u == 1)
    model, _ = stacked("tiedlora", rank=4, tiedlora_train="A")
    bank = _bank(model, "up", "A")
    assert torch.count_nonzero(bank.A) == 0 and torch.count_nonzero(bank.B) > 0


def test_tied_pair_stored_once_in_the_file(tmp_path):
    model, handle = stacked("tiedlora", rank=4, tiedlora_train="Buv")
    for kind in TARGETS:
        assert all(form_at(model, f"layers.{i}.{kind}").bank is _bank(model, kind, "Buv") for i in range(BLOCKS))
    handle.save(tmp_path)
    keys = load_file(str(tmp_path / "adapter.safetensors"))
    shared = sorted(k for k in keys if k.endswith((".A", ".B")))
    assert shared == sorted(f"layers.0.q.shared.tiedlora_Buv_r4_{t}.{w}" for t in TYPES.values() for w in "AB")
    assert sum(k.endswith((".u", ".v")) for k in keys) == 2 * BLOCKS * len(TARGETS)
    # the frozen A is saved too (a load must reproduce it); the file holds the trainable count plus A
    assert sum(keys[k].numel() for k in shared + [k for k in keys if k.endswith((".u", ".v"))]) == \
        handle.num_trainable() + sum(4 * fi for fi, _ in SHAPES.values())


def test_save_load_merge_keep_frozen_flags(tmp_path):
    model, handle = stacked("tiedlora", rank=4, tiedlora_train="Buv")
    x = layer_input(n=32, features=12)
    train_(model, handle, x)
    _perturb_all(model)
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.unmerge()
    handle.save(tmp_path)
    fresh = Stacked()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    assert loaded.num_trainable() == handle.num_trainable()
    assert not _bank(fresh, "q", "Buv").A.requires_grad and _bank(fresh, "q", "Buv").B.requires_grad


def test_shared_gradient_sums_over_layers():
    """d/dB of Σ_l <G_l, s·Λ_v,l B Λ_u,l A X_l> = s·Σ_l Λ_v,l G_l X_l^T A^T Λ_u,l."""
    model, handle = stacked("tiedlora", rank=4, alpha=4)
    _perturb_all(model)
    bank = _bank(model, "up")
    loss, ref = 0, torch.zeros_like(bank.B)
    for i in range(BLOCKS):
        layer, f = model.layers[i].up, form_at(model, f"layers.{i}.up")
        X, G = layer_input(n=7, features=12, seed=i), layer_input(n=7, features=20, seed=10 + i)
        loss = loss + (G * f(X, torch.zeros(7, 20, dtype=torch.float64), layer.linear_weight())).sum()
        ref += torch.diag(f.v.detach()) @ G.T @ X @ bank.A.detach().T @ torch.diag(f.u.detach())
    loss.backward()
    torch.testing.assert_close(bank.B.grad, ref, rtol=1e-6, atol=1e-12)


def test_rank_mask():
    model, handle = stacked("tiedlora", rank=4, rank_dropout=0.5)
    _perturb_all(model)
    layer, f = model.layers[1].up, form_at(model, "layers.1.up")
    x, y = layer_input(features=12), layer_input(features=20, seed=5)
    mask = torch.tensor([2.0, 0, 2, 0], dtype=torch.float64)
    ref = y + x @ (f.scale * _dense(f, f.bank, mask)).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=1e-12)


def test_refusals_before_the_model_changes():
    for bad in ("", "ABC", "AAu", "w", 3, None):
        with pytest.raises(lorazoo.SpecError, match="tiedlora_train"):
            lorazoo.AdapterSpec(form="tiedlora", tiedlora_train=bad)
    with pytest.raises(lorazoo.SpecError, match="tiedlora"):
        lorazoo.AdapterSpec(form="tiedlora", init="pissa")
    with pytest.raises(lorazoo.SpecError, match="loraplus.*freezes both"):  # no up-projection left to speed up
        lorazoo.AdapterSpec(form="tiedlora", tiedlora_train="Au", optim="loraplus")
    lorazoo.AdapterSpec(form="tiedlora", tiedlora_train="uv", optim="loraplus")
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="tiedlora", rank=13, targets=["fc1", "fc2"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert lorazoo.AdapterSpec.preset("tiedlora").options["tiedlora_train"] == "ABuv"


def test_forward_never_forms_the_update():
    model, handle = stacked("tiedlora", rank=4)
    _perturb_all(model)
    f, layer = form_at(model, "layers.0.up"), model.layers[0].up
    x = layer_input(features=12).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 20, dtype=torch.float64), layer.linear_weight()).sum().backward())
    assert (20, 12) not in shapes and (12, 20) not in shapes
