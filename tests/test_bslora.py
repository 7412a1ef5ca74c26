"""BSLoRA (Zhou et al. [52]; study Eq. 28-30): ΔW = s·(B_L A_L + T(B_S1 A_S1) + T(B_S2 A_S2)), S1 shared
within a block, S2 by all layers, T a Kronecker, gate or slice fit."""
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import lorazoo
from stacked import BLOCKS, SHAPES, TARGETS, Stacked, form_at, stacked
from tiny import TinyNet, layer_input, op_shapes, perturb, train

SIZES = dict(bslora_kron_size=8, bslora_gate_size=6)
KW = dict(rank=2, bslora_intra=3, bslora_inter=2, scale="constant", alpha=2, **SIZES)


def _banks(model):
    return model.layers[0].q.adapters["default"].shared


def _pair(model, part, mode, block):
    r = 3 if part == "intra" else 2
    where = f"layers_{block}" if part == "intra" else "model"
    return _banks(model)[f"bslora_{part}_{mode}_r{r}_{where}"]


def _T(f, bank, part, mode):
    """Eq. 29-30 in the (out, in) layout, from the tensors: kron (K_B ⊗ B)(K_A ⊗ A) cut to the layer;
    gate G_ou G_od B A G_iu G_id; slice the centre of the max-size pair."""
    A, B = bank.A.detach(), bank.B.detach()
    fin, fout = f.in_features, f.out_features
    if mode == "kron":
        KA = getattr(f, f"K_{part}_A").detach()[None, :]   # (1, ceil(in/k))
        KB = getattr(f, f"K_{part}_B").detach()[:, None]   # (ceil(out/k), 1)
        return (torch.kron(KB, B)[:fout] @ torch.kron(KA, A)[:, :fin])
    if mode == "gate":
        g = {n: getattr(f, f"G_{part}_{n}").detach() for n in ("id", "iu", "od", "ou")}
        return g["ou"][:, None] @ g["od"][None, :] @ B @ A @ g["iu"][:, None] @ g["id"][None, :]
    bi, bo = (A.shape[1] - fin) // 2, (B.shape[0] - fout) // 2
    return B[bo:bo + fout] @ A[:, bi:bi + fin]


def _all_tensors_off_init(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("mode", ["kron", "gate", "slice"])
def test_matches_dense_reference(mode):
    model, handle = stacked("bslora", bslora_mode=mode, **KW)
    _all_tensors_off_init(model)
    for i in range(BLOCKS):
        for kind in TARGETS:
            path = f"layers.{i}.{kind}"
            layer, f = model.get_submodule(path), form_at(model, path)
            dW = 2 * (f.B.detach() @ f.A.detach() + _T(f, _pair(model, "intra", mode, i), "intra", mode)
                      + _T(f, _pair(model, "inter", mode, 0), "inter", mode))
            x = layer_input(features=SHAPES[kind][0])
            ref = x @ (layer.base.weight.detach() + dW).T + layer.base.bias
            torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(f.delta_weight(None), dW, rtol=1e-6, atol=1e-12)


def _count(mode, rl=2, ri=3, re_=2, k=8, g=6):
    total = 0
    for fin, fout in SHAPES.values():
        per = rl * (fin + fout)
        if mode == "kron":
            per += 2 * (math.ceil(fin / k) + math.ceil(fout / k))
        elif mode == "gate":
            per += 2 * (fin + 2 * g + fout)
        total += BLOCKS * per
    kin, kout = {"kron": (k, k), "gate": (g, g),
                 "slice": (max(s[0] for s in SHAPES.values()), max(s[1] for s in SHAPES.values()))}[mode]
    return total + BLOCKS * ri * (kin + kout) + re_ * (kin + kout)


@pytest.mark.parametrize("mode", ["kron", "gate", "slice"])
def test_shared_pairs_stored_once_and_parameter_count(mode, tmp_path):
    model, handle = stacked("bslora", bslora_mode=mode, **KW)
    assert handle.num_trainable() == _count(mode)
    for i in range(BLOCKS):  # one intra pair per block, used by its three modules; one inter pair in all
        forms = [form_at(model, f"layers.{i}.{k}") for k in TARGETS]
        assert all(f.bank("intra") is _pair(model, "intra", mode, i) for f in forms)
        assert all(f.bank("inter") is _pair(model, "inter", mode, 0) for f in forms)
    handle.save(tmp_path)
    keys = load_file(str(tmp_path / "adapter.safetensors"))
    shared = sorted(k for k in keys if ".shared." in k)
    names = [f"bslora_intra_{mode}_r3_layers_{i}" for i in range(BLOCKS)] + [f"bslora_inter_{mode}_r2_model"]
    assert shared == sorted(f"layers.0.q.shared.{n}.{w}" for n in names for w in "AB")
    assert sum(t.numel() for k, t in keys.items() if "shift" not in k) == handle.num_trainable()


@pytest.mark.parametrize("mode", ["kron", "gate", "slice"])
def test_starts_as_base_with_the_official_init(mode):
    model, handle = stacked("bslora", bslora_mode=mode, **KW)
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, Stacked()(x).logits, rtol=0, atol=0)
    f = form_at(model, "layers.1.up")
    for part in ("intra", "inter"):
        assert torch.count_nonzero(f.bank(part).B) == 0 and f.bank(part).A.abs().sum() > 0
    assert torch.count_nonzero(f.B) == 0
    if mode == "kron":  # Linear(in/k, 1) and Linear(1, out/k) weights: bounds 1/sqrt(ceil(12/8)) and 1
        assert f.K_intra_A.abs().max() <= 1 / math.sqrt(2) and f.K_intra_B.abs().max() <= 1
    if mode == "gate":
        assert f.G_inter_id.abs().max() <= 1 / math.sqrt(12) and f.G_inter_od.abs().max() <= 1 / math.sqrt(6)


def test_gate_transform_is_rank_one_and_kron_tiles():
    model, handle = stacked("bslora", bslora_mode="gate", **KW)
    _all_tensors_off_init(model)
    f = form_at(model, "layers.0.up")
    assert torch.linalg.matrix_rank(_T(f, f.bank("intra"), "intra", "gate")) == 1
    # the whole update: local rank 2 plus one rank per shared part
    assert torch.linalg.matrix_rank(f.delta_weight(None)) == 4
    model, handle = stacked("bslora", bslora_mode="kron", **KW)
    _all_tensors_off_init(model)
    f = form_at(model, "layers.0.up")  # 12 -> 20 with k = 8: 2 copies of A (cut to 12), 3 of B (cut to 20)
    assert f.K_inter_A.shape == (2,) and f.K_inter_B.shape == (3,)
    assert torch.linalg.matrix_rank(f.delta_weight(None)) == 2 + 3 + 2


def test_blocks_of_paths():
    from lorazoo.forms.bslora import block_of
    assert block_of("model.layers.3.mlp.up_proj") == "model_layers_3"
    assert block_of("encoder.layer.11.attention.self.query") == "encoder_layer_11"
    assert block_of("fc1") == "all"
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec(form="bslora", targets=["fc1", "fc2"], **KW))
    assert sorted(model.fc1.adapters["default"].shared) == ["bslora_inter_kron_r2_model", "bslora_intra_kron_r3_all"]


def test_zero_shared_ranks_is_plain_lora():
    model, handle = stacked("bslora", rank=2, bslora_intra=0, bslora_inter=0, scale="constant", alpha=2)
    assert not hasattr(model.layers[0].q.adapters["default"], "shared")
    assert handle.num_trainable() == BLOCKS * sum(2 * (fi + fo) for fi, fo in SHAPES.values())


def test_shared_gradients_and_training(tmp_path):
    model, handle = stacked("bslora", **KW)
    x, y = layer_input(n=32, features=12), torch.arange(32) % 3
    before = _pair(model, "inter", "kron", 0).B.detach().clone()
    losses = train(model, handle, steps=25, lr=2e-2, data=(x, y))
    assert losses[-1] < losses[0] and not torch.equal(_pair(model, "inter", "kron", 0).B, before)
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.unmerge()
    handle.save(tmp_path)
    fresh = Stacked()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    assert loaded.num_trainable() == handle.num_trainable()
    assert form_at(fresh, "layers.2.down").bank("inter") is form_at(fresh, "layers.0.q").bank("inter")


@pytest.mark.parametrize("mode", ["kron", "gate"])
def test_rank_mask_on_every_hidden_dimension(mode):
    model, handle = stacked("bslora", bslora_mode=mode, **KW)
    _all_tensors_off_init(model)
    layer, f = model.layers[1].up, form_at(model, "layers.1.up")
    assert f.rank == 2 + 3 + 2
    mask = torch.tensor([2.0, 0, 0, 2, 2, 2, 0], dtype=torch.float64)
    masked = {}
    for part, sl in (("intra", slice(2, 5)), ("inter", slice(5, 7))):
        b = f.bank(part)
        m = SimpleNamespace(A=torch.diag(mask[sl]) @ b.A.detach(), B=b.B.detach())
        masked[part] = _T(f, m, part, mode)
    dW = 2 * (f.B.detach() @ torch.diag(mask[:2]) @ f.A.detach() + masked["intra"] + masked["inter"])
    x, y = layer_input(features=12), layer_input(features=20, seed=5)
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), y + x @ dW.T, rtol=1e-6, atol=1e-12)


def test_refusals_before_the_model_changes():
    for key, bad in (("bslora_intra", -1), ("bslora_inter", 1.5), ("bslora_mode", "concat"),
                     ("bslora_kron_size", 0), ("bslora_gate_size", "x")):
        with pytest.raises(lorazoo.SpecError, match=key):
            lorazoo.AdapterSpec(form="bslora", **{key: bad})
    with pytest.raises(lorazoo.SpecError, match="bslora"):
        lorazoo.AdapterSpec(form="bslora", init="pissa")
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="bslora", rank=13, targets=["fc1", "fc2"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    p = lorazoo.AdapterSpec.preset("bslora")
    assert (p.rank, p.alpha, p.scale, p.options["bslora_intra"], p.options["bslora_inter"],
            p.options["bslora_mode"], p.options["bslora_kron_size"]) == (2, 2, "constant", 4, 8, "kron", 256)


@pytest.mark.parametrize("mode", ["kron", "gate", "slice"])
def test_forward_never_forms_the_update(mode):
    model, handle = stacked("bslora", bslora_mode=mode, **KW)
    _all_tensors_off_init(model)
    f, layer = form_at(model, "layers.0.up"), model.layers[0].up
    x = layer_input(features=12).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 20, dtype=torch.float64), layer.linear_weight()).sum().backward())
    assert (20, 12) not in shapes and (12, 20) not in shapes
