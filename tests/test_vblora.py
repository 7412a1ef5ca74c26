"""VB-LoRA (Li, Han & Ji [54]): sub-vectors of A and B are top-k softmax mixtures of one shared bank."""
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorazoo
from stacked import BLOCKS, SHAPES, TARGETS, Stacked, form_at, stacked
from tiny import TinyNet, layer_input, op_shapes, perturb, train

OPTS = dict(vblora_num_vectors=6, vblora_vector_length=4, vblora_topk=2)


def _bank(model):
    (bank,) = model.layers[0].q.adapters["default"].shared.values()  # one bank per adapter
    return bank.vectors


def _mix(logits, vectors, k):
    """One sub-vector: the k largest logits (by a full sort), softmax over them, weighted bank rows."""
    order = torch.sort(logits, descending=True).indices[:k]
    w = torch.exp(logits[order]) / torch.exp(logits[order]).sum()
    return sum(w[j] * vectors[order[j]] for j in range(k))


def _dense(f, vectors, k=2, b=4):
    """VB-LoRA's admixture with loops: row i of A is its ceil(in/b) sub-vectors in order, column j of B its
    ceil(out/b) sub-vectors; both cut to the layer's size."""
    LA, LB, V = f.logits_A.detach(), f.logits_B.detach(), vectors.detach()
    A = torch.stack([torch.cat([_mix(LA[i, t], V, k) for t in range(LA.shape[1])])[: f.in_features]
                     for i in range(f.rank)])
    B = torch.stack([torch.cat([_mix(LB[t, j], V, k) for t in range(LB.shape[0])])[: f.out_features]
                     for j in range(f.rank)], dim=1)
    return f.scale * B @ A


def test_matches_dense_reference_on_every_layer():
    model, handle = stacked("vblora", rank=3, alpha=6, **OPTS)
    perturb(handle)
    V = _bank(model)
    for i in range(BLOCKS):
        for kind in TARGETS:
            path = f"layers.{i}.{kind}"
            layer, f = model.get_submodule(path), form_at(model, path)
            dW = _dense(f, V)
            assert f.bank.vectors is V
            x = layer_input(features=SHAPES[kind][0])
            ref = x @ (layer.base.weight.detach() + dW).T + layer.base.bias
            torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(f.delta_weight(None), dW, rtol=1e-6, atol=1e-12)


def test_sizes_not_multiple_of_b_cut_the_last_sub_vector():
    model, handle = stacked("vblora", rank=2, vblora_num_vectors=5, vblora_vector_length=8)
    f = form_at(model, "layers.0.up")  # 12 -> 20: 2 sub-vectors per A row, 3 per B column
    assert f.logits_A.shape == (2, 2, 5) and f.logits_B.shape == (3, 2, 5)
    perturb(handle)
    torch.testing.assert_close(f.delta_weight(None), _dense(f, f.bank.vectors, b=8), rtol=1e-6, atol=1e-12)


def test_equals_peft_with_the_same_tensors():
    """PEFT's VB-LoRA (same bank and logits copied in) gives the same output in float32."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(32, 48))
    ours = nn.Sequential(nn.Linear(32, 48))
    ours.load_state_dict(theirs.state_dict())
    cfg = peft.VBLoRAConfig(r=4, num_vectors=8, vector_length=16, topk=2, target_modules=["0"])
    pm = peft.get_peft_model(theirs, cfg)
    handle = lorazoo.adapt(ours, lorazoo.AdapterSpec(form="vblora", rank=4, targets=["0"], scale="constant", alpha=1,
                                                     vblora_num_vectors=8, vblora_vector_length=16, vblora_topk=2))
    f = ours[0].adapters["default"].form
    layer = pm.base_model.model[0]
    with torch.no_grad():
        f.logits_A.copy_(layer.vblora_logits_A["default"])
        f.logits_B.copy_(layer.vblora_logits_B["default"])
        f.bank.vectors.copy_(layer.vblora_vector_bank["default"])
        f.bank.vectors.mul_(40)  # a larger bank than the init's, so the update is far above rounding
        layer.vblora_vector_bank["default"].mul_(40)
    x = torch.randn(5, 32)
    torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.delta_weight(None), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    assert (ours(x) - ours[0].base(x)).abs().max() > 1e-2
    # same parameter count as PEFT reports (bank + logits)
    assert handle.num_trainable() == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_init_as_peft_and_the_paper():
    model, handle = stacked("vblora", rank=4, vblora_num_vectors=64, vblora_vector_length=4)
    V = _bank(model)
    assert V.abs().max() <= 0.02 and V.abs().max() > 0.018  # U(-0.02, 0.02)
    L = torch.cat([form_at(model, f"layers.{i}.{k}").logits_A.flatten() for i in range(BLOCKS) for k in TARGETS])
    assert abs(L.std().item() - 0.1) < 0.01 and abs(L.mean().item()) < 0.01  # N(0, 0.1²)
    # the paper's update is nonzero (and small) at init: the form says so, the contract skips "starts as base"
    dW = form_at(model, "layers.0.up").delta_weight(None)
    assert 0 < dW.abs().max() <= 4 * 0.02 ** 2 * (16 / 4)  # |ΔW_ij| <= r·bound² times the scale
    assert not lorazoo.registry.FORMS.get("vblora").obj.zero_init
    same = stacked("vblora", rank=4, vblora_num_vectors=64, vblora_vector_length=4)[0]
    torch.testing.assert_close(_bank(same), V, rtol=0, atol=0)  # from the spec's seed
    assert not torch.equal(_bank(stacked("vblora", rank=4, seed=1, vblora_num_vectors=64,
                                         vblora_vector_length=4)[0]), V)


def test_bank_stored_once_and_parameter_count(tmp_path):
    model, handle = stacked("vblora", rank=3, **OPTS)
    h, b, r = 6, 4, 3
    expect = h * b + BLOCKS * sum(r * (math.ceil(fi / b) + math.ceil(fo / b)) * h for fi, fo in SHAPES.values())
    assert handle.num_trainable() == expect
    params = handle.trainable_parameters()
    assert len({id(p) for p in params}) == len(params)
    handle.save(tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert [k for k in tensors if k.endswith("vectors")] == ["layers.0.q.shared.vblora_6x4.vectors"]
    assert sum(t.numel() for k, t in tensors.items() if "logits" in k or "vectors" in k) == expect


def test_gradient_reaches_only_the_top_k_logits_and_the_bank():
    model, handle = stacked("vblora", rank=3, **OPTS)
    model.layers[0].up(layer_input(features=12)).sum().backward()
    f = form_at(model, "layers.0.up")
    nonzero = (f.logits_A.grad != 0).sum(-1)
    assert nonzero.max() <= 2 and nonzero.min() >= 1
    assert _bank(model).grad.abs().sum() > 0


def test_training_save_load_merge(tmp_path):
    model, handle = stacked("vblora", rank=3, **OPTS)
    x, y = layer_input(n=32, features=12), torch.arange(32) % 3
    before = _bank(model).detach().clone()
    losses = train(model, handle, steps=25, lr=5e-2, data=(x, y))
    assert losses[-1] < losses[0] and not torch.equal(_bank(model), before)
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.unmerge()
    handle.save(tmp_path)
    fresh = Stacked()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    assert form_at(fresh, "layers.2.down").bank is form_at(fresh, "layers.0.q").bank
    assert loaded.num_trainable() == handle.num_trainable()


def test_rank_mask():
    model, handle = stacked("vblora", rank=3, **OPTS)
    layer, f = model.layers[1].up, form_at(model, "layers.1.up")
    x, y = layer_input(features=12), layer_input(features=20, seed=5)
    mask = torch.tensor([2.0, 0, 2], dtype=torch.float64)
    B, A = f.pair()
    ref = y + x @ (f.scale * B.detach() @ torch.diag(mask) @ A.detach()).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=1e-12)


def test_refusals_before_the_model_changes():
    for key, bad in (("vblora_num_vectors", 0), ("vblora_vector_length", 2.5), ("vblora_topk", 0),
                     ("vblora_bank_bound", 0.0), ("vblora_logits_std", -1.0)):
        with pytest.raises(lorazoo.SpecError, match=key):
            lorazoo.AdapterSpec(form="vblora", **{key: bad})
    with pytest.raises(lorazoo.SpecError, match=r"vblora_topk \(9\) must be at most vblora_num_vectors \(8\)"):
        lorazoo.AdapterSpec(form="vblora", vblora_topk=9, vblora_num_vectors=8)
    with pytest.raises(lorazoo.SpecError, match="vblora"):
        lorazoo.AdapterSpec(form="vblora", init="pissa")
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="vblora", rank=13, targets=["fc1", "fc2"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    p = lorazoo.AdapterSpec.preset("vblora")
    opts = p.options
    assert (opts["vblora_num_vectors"], opts["vblora_vector_length"], opts["vblora_topk"]) == (256, 256, 2)
    assert (p.scale, p.alpha) == ("constant", 1)


def test_forward_never_forms_the_update():
    model, handle = stacked("vblora", rank=3, **OPTS)
    f, layer = form_at(model, "layers.0.up"), model.layers[0].up
    x = layer_input(features=12).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 20, dtype=torch.float64), layer.linear_weight()).sum().backward())
    assert (20, 12) not in shapes and (12, 20) not in shapes
