"""MoRA (Jiang et al. 2024 [46]): h = W0 x + s·f_decomp(M f_comp(x)), M square r̂ x r̂, r̂ = floor(sqrt((in+out)r)).

The dense references build the compress and decompress operators entry by entry from the paper's
definitions (truncation, sharing Eq. 6, decoupling, rotation Eq. 9), never from the form."""
import math

import pytest
import torch

import lorazoo
from lorazoo.forms.mora import resolve_type, square_rank
from tiny import TinyNet, adapted, layer_input, perturb, single_layer, tiny_data

TYPES = ("truncation", "sharing", "decoupling", "rotation")
# (in, out, r): out > r̂ (repeat), out < c·r̂ (cut), r̂ > in (wrap around several times), r̂ divides in
SHAPES = [(20, 24, 3), (30, 7, 2), (4, 40, 3), (24, 24, 3)]


def _rhat(fin, fout, r, kind):
    r_hat = int(math.floor(math.sqrt((fin + fout) * r)))
    return r_hat - r_hat % 2 if kind == "rotation" else r_hat


def _rotation_block(M, i, r_hat):
    """M·R_i, R_i v = v ⊙ cos(iθ) + rot(v) ⊙ sin(iθ), rot(v)_a = -v_{a+h} (a < h), v_{a-h} (a >= h)."""
    h = r_hat // 2
    R = torch.zeros(r_hat, r_hat, dtype=torch.float64)
    for a in range(r_hat):
        theta = i * 10000 ** (-2 * (a % h) / r_hat)
        R[a, a] = math.cos(theta)
        if a < h:
            R[a, a + h] = -math.sin(theta)
        else:
            R[a, a - h] = math.sin(theta)
    return M @ R


def reference_delta(M, fin, fout, kind, scale=1.0, mask=None):
    """ΔW from the paper's operators, entry by entry."""
    r_hat = M.shape[0]
    M = M if mask is None else mask[:, None] * M  # the mask acts on M's outputs
    if kind in ("truncation", "sharing"):
        C = torch.zeros(r_hat, fin, dtype=torch.float64)
        D = torch.zeros(fout, r_hat, dtype=torch.float64)
        if kind == "truncation":  # x[:r̂] (zeros past in), [z; 0]
            for k in range(min(r_hat, fin)):
                C[k, k] = 1
            for o in range(min(r_hat, fout)):
                D[o, o] = 1
        else:  # the extended input p reads x[p mod in] and goes to group slot p mod r̂
            n = math.ceil(fin / r_hat) * r_hat
            for p in range(n):
                C[p % r_hat, p % fin] += 1
            for o in range(fout):
                D[o, o % r_hat] = 1
        return scale * D @ M @ C
    c = math.ceil(fin / r_hat)
    n = c * r_hat
    P = torch.zeros(n, fin, dtype=torch.float64)
    for p in range(n):
        P[p, p % fin] = 1
    blocks = [M if kind == "decoupling" else _rotation_block(M, i, r_hat) for i in range(c)]
    BD = torch.block_diag(*blocks)
    T = torch.zeros(fout, n, dtype=torch.float64)
    for o in range(fout):
        T[o, o % n] = 1
    return scale * T @ BD @ P


def _form(layer):
    return layer.adapters["default"].form


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_reference(kind, shape):
    fin, fout, r = shape
    model, handle, layer = single_layer("mora", in_features=fin, out_features=fout, rank=r, alpha=3,
                                        mora_type=kind)
    perturb(handle)
    f = _form(layer)
    assert f.mora_type == kind and f.rank == _rhat(fin, fout, r, kind) and f.M.shape == (f.rank, f.rank)
    ref = reference_delta(f.M.detach(), fin, fout, kind, scale=3 / r)
    x = layer_input(features=fin)
    torch.testing.assert_close(f.delta_weight(layer.linear_weight()), ref, rtol=1e-10, atol=1e-12)
    expected = x @ (layer.base.weight.detach() + ref).T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", TYPES)
def test_rank_mask_on_the_outputs_of_M(kind):
    model, handle, layer = single_layer("mora", in_features=20, out_features=24, rank=3, mora_type=kind)
    perturb(handle)
    f = _form(layer)
    mask = torch.zeros(f.rank, dtype=torch.float64)
    mask[::3] = 3.0
    x, y = layer_input(features=20), layer_input(features=24, seed=5)
    ref = y + x @ reference_delta(f.M.detach(), 20, 24, kind, scale=f.scale, mask=mask).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fin,fout,r", [(4096, 4096, 8), (4096, 11008, 16), (12, 16, 4), (768, 3072, 1),
                                        (5, 3, 2)])
def test_square_rank_never_exceeds_lora_parameters(fin, fout, r):
    for kind in TYPES:
        r_hat = square_rank(fin, fout, r, kind)
        assert r_hat == max(2 if kind == "rotation" else 1, _rhat(fin, fout, r, kind))
        assert r_hat * r_hat <= (fin + fout) * r
        if kind != "rotation":
            assert (r_hat + 1) ** 2 > (fin + fout) * r  # the largest such square


def test_auto_follows_the_papers_choice():
    assert resolve_type(4096, 4096, 8, "auto") == "rotation"   # r = 8: 16 inputs per group
    assert resolve_type(4096, 4096, 128, "auto") == "sharing"  # r = 128: 4 per group
    assert resolve_type(4096, 4096, 256, "auto") == "sharing"
    assert resolve_type(4096, 4096, 8, "sharing") == "sharing"
    model, handle = adapted("mora", rank=4)
    assert model.fc2.adapters["default"].form.mora_type == "sharing"  # 16 -> 16 at r = 4: 2 per group


@pytest.mark.parametrize("kind", TYPES)
def test_starts_as_base_and_M_learns(kind):
    x, labels = tiny_data(16)
    base = TinyNet()(x).logits
    model, handle = adapted("mora", rank=4, mora_type=kind)
    f = model.fc1.adapters["default"].form
    assert torch.count_nonzero(f.M) == 0
    out = model(x=x, labels=labels)
    torch.testing.assert_close(out.logits, base, rtol=0, atol=0)
    out.loss.backward()
    assert f.M.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "fc1.adapters.default.form.M", "fc2.adapters.default.form.M"]


def test_rank_is_high_for_decoupling_and_rotation_bounded_for_sharing():
    ranks = {}
    for kind in TYPES:
        model, handle, layer = single_layer("mora", in_features=32, out_features=32, rank=1, mora_type=kind)
        perturb(handle)
        f = _form(layer)
        ranks[kind] = int(torch.linalg.matrix_rank(f.delta_weight(layer.linear_weight())))
        assert f.M.numel() <= 64  # LoRA-1 on 32 x 32
    assert ranks["sharing"] <= 8 and ranks["truncation"] <= 8  # r̂ = 8
    assert ranks["decoupling"] == 32 and ranks["rotation"] == 32  # full rank from 64 parameters


def test_scale_parts_compose():
    _, h1, l1 = single_layer("mora", rank=3, alpha=2, mora_type="sharing")
    _, h2, l2 = single_layer("mora", rank=3, alpha=2, mora_type="sharing", scale="rslora")
    with torch.no_grad():
        _form(l2).M.copy_(torch.randn(_form(l2).M.shape, generator=torch.Generator().manual_seed(0)))
        _form(l1).M.copy_(_form(l2).M)
    ratio = (2 / math.sqrt(3)) / (2 / 3)
    torch.testing.assert_close(_form(l2).delta_weight(l2.linear_weight()),
                               ratio * _form(l1).delta_weight(l1.linear_weight()), rtol=1e-12, atol=0)


def test_preset_matches_authors_scaling():
    spec = lorazoo.AdapterSpec.preset("mora", targets=["fc1"])
    assert spec.form == "mora" and spec.scale == "constant" and spec.alpha == 1 and spec.options["mora_type"] == "auto"


def test_refusals_before_the_model_changes():
    with pytest.raises(lorazoo.SpecError, match="mora_type"):
        lorazoo.AdapterSpec(form="mora", mora_type="rope")
    with pytest.raises(lorazoo.SpecError, match="mora"):
        lorazoo.AdapterSpec(form="mora", init="pissa")  # no plain B·A factors
    with pytest.raises(lorazoo.SpecError, match="lora_pro"):
        lorazoo.AdapterSpec(form="mora", optim="lora_pro")
    with pytest.raises(lorazoo.SpecError, match="relora|mora"):
        lorazoo.AdapterSpec(form="mora", schedule="relora")
    model, handle = adapted("mora", rank=4, optim="loraplus")
    with pytest.raises(lorazoo.SpecError, match="up-projection"):  # no B-like parameter to speed up
        handle.param_groups(1e-3)


@pytest.mark.parametrize("kind", ["sharing", "rotation"])
def test_conv_layer_merges_exactly(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    base = model(x)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="mora", rank=2, targets="all-conv", mora_type=kind))
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    perturb(handle)
    out = model(x)
    handle.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-10)
