"""MeLoRA (Ren et al. [42]; study Eq. 14-15): ΔW = s·⊕_i B_i A_i, n mini LoRAs of rank r each on the
block diagonal, rank up to n·r with LoRA-r's parameter count."""
import math

import pytest
import torch
from torch import nn

import lorazoo
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, rank_mask_draw, single_layer, train


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def _dense(f, in_cuts, out_cuts, mask=None):
    """Eq. 14 in float64: a zero (out, in) matrix with B_i diag(m_i) A_i written into block i.

    ``in_cuts``/``out_cuts``: block boundaries, written out by hand in each test."""
    r = f.A.shape[0]
    m = torch.ones(len(in_cuts) - 1, r, dtype=torch.float64) if mask is None else mask.view(-1, r)
    dW = torch.zeros(f.out_features, f.in_features, dtype=torch.float64)
    for i in range(len(in_cuts) - 1):
        (i0, i1), (o0, o1) = in_cuts[i:i + 2], out_cuts[i:i + 2]
        A_i, B_i = f.A.detach()[:, i0:i1], f.B.detach()[o0:o1, :]
        for k in range(r):
            dW[o0:o1, i0:i1] += m[i, k] * torch.outer(B_i[:, k], A_i[k])
    return dW


def test_matches_dense_reference_two_blocks():
    model, handle = adapted("melora", rank=3, alpha=6, melora_blocks=2)
    perturb(handle)
    for name, fin, cuts_in in (("fc1", 12, [0, 6, 12]), ("fc2", 16, [0, 8, 16])):
        layer, f = getattr(model, name), _form(model, name)
        dW = _dense(f, cuts_in, [0, 8, 16])
        W0, b = layer.base.weight.detach(), layer.base.bias.detach()
        x = layer_input(features=fin)
        torch.testing.assert_close(layer(x), x @ (W0 + 2.0 * dW).T + b, rtol=1e-6, atol=0)
        torch.testing.assert_close(f.delta_weight(W0), 2.0 * dW, rtol=1e-10, atol=1e-12)
        assert torch.count_nonzero(dW[:8, cuts_in[1]:]) == 0 and torch.count_nonzero(dW[8:, :cuts_in[1]]) == 0


def test_uneven_shapes_are_cut_like_tensor_split():
    """20 inputs, 24 outputs, 3 blocks: inputs 7, 7, 6; outputs 8, 8, 8; still block diagonal."""
    model, handle, layer = single_layer("melora", in_features=20, out_features=24, rank=2, melora_blocks=3)
    perturb(handle)
    f = layer.adapters["default"].form
    dW = _dense(f, [0, 7, 14, 20], [0, 8, 16, 24])
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    x = layer_input(n=4, features=20)
    torch.testing.assert_close(layer(x), x @ (W0 + f.scale * dW).T + b, rtol=1e-6, atol=0)
    torch.testing.assert_close(f.delta_weight(W0), f.scale * dW, rtol=1e-10, atol=1e-12)
    x3 = x.view(2, 2, 20)  # leading batch dims
    torch.testing.assert_close(layer(x3), layer(x).view(2, 2, 24))
    assert torch.linalg.matrix_rank(f.delta_weight(W0)) == 6  # n·r


def test_rank_is_n_times_r_with_loras_parameter_count():
    model, handle = adapted("melora", rank=2, melora_blocks=2)
    perturb(handle)
    f = _form(model)
    dW = f.delta_weight(model.fc2.linear_weight())
    assert torch.linalg.matrix_rank(dW) == 4  # 2 blocks x rank 2, above a rank-2 LoRA
    assert handle.num_trainable() == 2 * (12 + 16) + 2 * (16 + 16)  # r·(in + out) per layer, as LoRA-r
    four = adapted("melora", rank=2, melora_blocks=4)
    perturb(four[1])
    assert torch.linalg.matrix_rank(_form(four[0]).delta_weight(four[0].fc2.linear_weight())) == 8


def test_starts_as_base_with_per_block_kaiming():
    model, handle = adapted("melora", rank=4, melora_blocks=2)
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)
    for name, half in (("fc1", 6), ("fc2", 8)):
        f = _form(model, name)
        assert torch.count_nonzero(f.B) == 0
        bound = 1 / math.sqrt(half)  # nn.Linear(in/n, r)'s Kaiming bound, not 1/sqrt(in)
        for A_i in (f.A[:, :half], f.A[:, half:]):
            assert A_i.abs().max() <= bound and A_i.abs().max() > 0.7 * bound
    model(x).logits.sum().backward()
    assert torch.count_nonzero(_form(model).B.grad) > 0


def test_one_block_is_lora():
    x = layer_input(features=12)
    outs = []
    for form, kw in (("lora", {}), ("melora", {"melora_blocks": 1})):
        model, handle = adapted(form, rank=3, alpha=5, **kw)
        perturb(handle)
        outs.append(model(x).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-14)


def test_rank_mask_has_n_times_r_entries():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="melora", rank=3, rank_dropout=0.5, targets=["fc2"]))
    perturb(handle)
    f, W0, b = _form(model), model.fc2.base.weight.detach(), model.fc2.base.bias.detach()
    assert f.rank == 6
    x = layer_input()
    seed, keep = rank_mask_draw(6, 0.5)
    torch.manual_seed(seed)
    out = model.fc2(x)
    torch.testing.assert_close(out, x @ (W0 + f.scale * _dense(f, [0, 8, 16], [0, 8, 16], keep)).T + b,
                               rtol=1e-6, atol=0)
    # uneven blocks take the loop path: same mask semantics
    model, handle, layer = single_layer("melora", in_features=20, out_features=24, rank=2, melora_blocks=3)
    perturb(handle)
    f = layer.adapters["default"].form
    mask = torch.tensor([2.0, 0.0, 0.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    x, y = layer_input(features=20), layer_input(n=5, features=24, seed=2)
    ref = y + x @ (f.scale * _dense(f, [0, 7, 14, 20], [0, 8, 16, 24], mask)).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=0)


def test_rank_limit_names_the_layer_and_bad_blocks_refused():
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError, match=r"(?s)'fc1'.*'melora' allows at most 3"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="melora", rank=4, melora_blocks=4, targets=["fc1"]))
    assert not any(isinstance(m, lorazoo.layer.AdaptedLayer) for m in model.modules())  # untouched
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(lorazoo.SpecError, match="melora_blocks"):
            lorazoo.AdapterSpec(form="melora", melora_blocks=bad)


@pytest.mark.parametrize("blocks, fin", [(2, 20), (3, 20)])
def test_forward_never_forms_the_update(blocks, fin):
    model, handle, layer = single_layer("melora", in_features=fin, rank=2, melora_blocks=blocks)
    perturb(handle)
    f = layer.adapters["default"].form
    x = layer_input(features=fin).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None)
                       .sum().backward())
    assert (24, fin) not in shapes and (fin, 24) not in shapes
    assert f.A.grad is not None and f.B.grad is not None
    assert (24, fin) in op_shapes(lambda: f.delta_weight(layer.linear_weight()))


@pytest.mark.parametrize("kw", [dict(scale="rslora"), dict(optim="loraplus"), dict(rank_dropout=0.3)])
def test_meaningful_combinations_train(kw):
    model, handle = adapted("melora", rank=2, **kw)
    losses = train(model, handle, steps=10, lr=3e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kw, part", [(dict(init="pissa"), "pissa"), (dict(init="eva"), "eva"),
                                       (dict(optim="lora_pro"), "lora_pro"), (dict(schedule="relora"), "relora")])
def test_meaningless_combinations_refused_at_spec(kw, part):
    with pytest.raises(lorazoo.SpecError, match=rf"(?s)'{part}'.*'melora'"):
        lorazoo.AdapterSpec(form="melora", **kw)


def test_leading_batch_dims():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6)).double()
    handle = lorazoo.adapt(net, lorazoo.AdapterSpec(form="melora", rank=1, targets=["0"]))
    perturb(handle)
    f = net[0].adapters["default"].form
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ref = x @ (net[0].base.weight.detach() + f.scale * _dense(f, [0, 4, 8], [0, 3, 6])).T + net[0].base.bias
    torch.testing.assert_close(net(x), ref, rtol=1e-8, atol=1e-12)
