"""ShareLoRA (Song et al. [47]; study Eq. 22-23): ΔW = s·B A with A, B or both shared across layers."""
import pytest
import torch
from safetensors.torch import load_file

import lorazoo
from stacked import BLOCKS, SHAPES, TARGETS, Stacked, form_at, stacked
from tiny import TinyNet, layer_input, op_shapes, perturb, train

TYPES = {"q": "layers_N_q_12x12", "up": "layers_N_up_12x20", "down": "layers_N_down_20x12"}


def _banks(model):
    return model.layers[0].q.adapters["default"].shared


def _dense(path, model, share, scope, s):
    """ΔW = s·B A written from the stored tensors: the shared ones read straight from the bank
    (sliced to the layer for the study's all-target scope, Eq. 23), the local ones from the layer."""
    kind = path.rsplit(".", 1)[1]
    fin, fout = SHAPES[kind]
    f = form_at(model, path)
    bank = _banks(model)[f"sharelora_{share}_r4_" + (TYPES[kind] if scope == "type" else "all")]
    A = bank.A.detach()[:, :fin] if "A" in share else f.A.detach()
    B = bank.B.detach()[:fout, :] if "B" in share else f.B.detach()
    return s * B @ A


@pytest.mark.parametrize("share", ["A", "B", "AB"])
@pytest.mark.parametrize("scope", ["type", "all"])
def test_matches_dense_reference(share, scope):
    model, handle = stacked("sharelora", rank=4, alpha=6, sharelora_share=share, sharelora_scope=scope)
    perturb(handle)
    for i in range(BLOCKS):
        for kind in TARGETS:
            path = f"layers.{i}.{kind}"
            layer = model.get_submodule(path)
            dW = _dense(path, model, share, scope, 6 / 4)
            x = layer_input(features=SHAPES[kind][0])
            ref = x @ (layer.base.weight.detach() + dW).T + layer.base.bias
            torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(form_at(model, path).delta_weight(None), dW, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_starts_as_base_with_lora_init(share):
    model, handle = stacked("sharelora", rank=4, sharelora_share=share)
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, Stacked()(x).logits, rtol=0, atol=0)
    for kind in TARGETS:
        f = form_at(model, f"layers.1.{kind}")
        B, A = f.pair()
        assert torch.count_nonzero(B) == 0
        bound = (1 / SHAPES[kind][0]) ** 0.5  # Kaiming-uniform a = sqrt(5): U(±1/sqrt(in))
        assert 0.5 * bound < A.abs().max() <= bound


def _count(share, scope, r=4):
    """Trainable count from the paper's configurations: a shared factor once per module type (or
    once for all targets at the largest shape), a local one per layer."""
    total = 0
    for fin, fout in SHAPES.values():
        total += (r * fin if scope == "type" else 0) if "A" in share else BLOCKS * r * fin
        total += (r * fout if scope == "type" else 0) if "B" in share else BLOCKS * r * fout
    if scope == "all":
        total += r * max(s[0] for s in SHAPES.values()) if "A" in share else 0
        total += r * max(s[1] for s in SHAPES.values()) if "B" in share else 0
    return total


@pytest.mark.parametrize("share", ["A", "B", "AB"])
@pytest.mark.parametrize("scope", ["type", "all"])
def test_shared_factors_stored_once_and_counted_as_the_paper(share, scope, tmp_path):
    model, handle = stacked("sharelora", rank=4, sharelora_share=share, sharelora_scope=scope)
    assert handle.num_trainable() == _count(share, scope)
    lora = sum(BLOCKS * 4 * (fi + fo) for fi, fo in SHAPES.values())
    assert handle.num_trainable() < lora
    params = handle.trainable_parameters()
    assert len({id(p) for p in params}) == len(params)
    # the same tensor object is used by every layer of a type
    for kind in TARGETS:
        pairs = [form_at(model, f"layers.{i}.{kind}").pair() for i in range(BLOCKS)]
        for j, name in ((1, "A"), (0, "B")):
            ptrs = {p[j].data_ptr() for p in pairs}
            assert len(ptrs) == (1 if name in share else BLOCKS)
    handle.save(tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter.safetensors")))
    shared = [k for k in keys if ".shared." in k]
    types = TYPES.values() if scope == "type" else ["all"]
    assert shared == sorted(f"layers.0.q.shared.sharelora_{share}_r4_{t}.{w}" for t in types for w in share)
    local = [k for k in keys if k.endswith((".A", ".B")) and ".shared." not in k]
    assert len(local) == len(TARGETS) * BLOCKS * (2 - len(share))
    assert sum(load_file(str(tmp_path / "adapter.safetensors"))[k].numel() for k in shared + local) == \
        handle.num_trainable()


def test_shared_factor_gets_every_layers_gradient():
    """d/dA_S of Σ_l <G_l, s·B_l A_S X_l> = s·Σ_l B_l^T G_l X_l^T."""
    model, handle = stacked("sharelora", rank=4, alpha=4)
    perturb(handle)
    bank = _banks(model)[f"sharelora_A_r4_{TYPES['up']}"]
    loss, ref = 0, torch.zeros_like(bank.A)
    for i in range(BLOCKS):
        layer, f = model.layers[i].up, form_at(model, f"layers.{i}.up")
        X, G = layer_input(n=7, features=12, seed=i), layer_input(n=7, features=20, seed=10 + i)
        loss = loss + (G * f(X, torch.zeros(7, 20, dtype=torch.float64), layer.linear_weight())).sum()
        ref += f.B.detach().T @ G.T @ X
    loss.backward()
    torch.testing.assert_close(bank.A.grad, ref, rtol=1e-6, atol=1e-12)


def test_merge_save_load_and_training(tmp_path):
    model, handle = stacked("sharelora", rank=4, sharelora_share="AB")
    x, y = layer_input(n=32, features=12), torch.arange(32) % 3
    before = _banks(model)[f"sharelora_AB_r4_{TYPES['q']}"].B.detach().clone()
    losses = train(model, handle, steps=20, lr=2e-2, data=(x, y))
    assert losses[-1] < losses[0]
    assert not torch.equal(_banks(model)[f"sharelora_AB_r4_{TYPES['q']}"].B, before)
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.unmerge()
    handle.save(tmp_path)
    fresh = Stacked()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    fa, fb = form_at(fresh, "layers.0.down"), form_at(fresh, "layers.2.down")
    assert fa.bank is fb.bank and loaded.num_trainable() == handle.num_trainable()


def test_rank_mask_and_rank_dropout():
    model, handle = stacked("sharelora", rank=4, rank_dropout=0.5)
    perturb(handle)
    layer, f = model.layers[1].up, form_at(model, "layers.1.up")
    x, y = layer_input(features=12), layer_input(features=20, seed=5)
    mask = torch.tensor([2.0, 0, 2, 0], dtype=torch.float64)
    B, A = f.B.detach(), _banks(model)[f"sharelora_A_r4_{TYPES['up']}"].A.detach()
    ref = y + x @ (f.scale * B @ torch.diag(mask) @ A).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=1e-12)


def test_refusals_before_the_model_changes():
    for key, bad in (("sharelora_share", "C"), ("sharelora_share", 1), ("sharelora_scope", "layer")):
        with pytest.raises(lorazoo.SpecError, match=key):
            lorazoo.AdapterSpec(form="sharelora", **{key: bad})
    for init in ("pissa", "olora"):  # a shared factor cannot be set per layer
        with pytest.raises(lorazoo.SpecError, match="sharelora"):
            lorazoo.AdapterSpec(form="sharelora", init=init)
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(form="sharelora", optim="lora_pro")
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="sharelora", rank=13, targets=["fc1", "fc2"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert lorazoo.AdapterSpec.preset("sharelora").options["sharelora_share"] == "A"


def test_loraplus_groups_the_up_projection_once():
    for share in ("A", "B"):
        model, handle = stacked("sharelora", rank=4, sharelora_share=share, optim="loraplus")
        groups = {g["name"]: g["params"] for g in handle.param_groups(1e-3)}
        fast = {id(p) for p in groups["B"]}
        f = form_at(model, "layers.1.up")
        B, A = (f.bank.B, f.A) if share == "B" else (f.B, f.bank.A)
        assert id(B) in fast and id(A) not in fast
        assert sum(len(v) for v in groups.values()) == len(handle.trainable_parameters())


def test_forward_never_forms_the_update():
    model, handle = stacked("sharelora", rank=4, sharelora_scope="all")
    perturb(handle)
    f, layer = form_at(model, "layers.0.up"), model.layers[0].up
    x = layer_input(features=12).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 20, dtype=torch.float64), layer.linear_weight()).sum().backward())
    assert (20, 12) not in shapes and (12, 20) not in shapes
