"""HiRA (Huang et al. [45]; study Eq. 17): ΔW = s·W0 ⊙ (B A), A Kaiming, B zero; rank up to rank(W0)·r."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo.forms.dense import DenseLinear
from tiny import TinyNet, adapted, layer_input, perturb, rank_mask_draw, single_layer, train


def _form(model, name="fc2"):
    return getattr(model, name).adapters["default"].form


def _dense(W0, B, A, s, mask=None):
    """Eq. 17 in float64, entry by entry: ΔW_ij = s·W0_ij·Σ_k B_ik m_k A_kj."""
    m = torch.ones(A.shape[0], dtype=torch.float64) if mask is None else mask
    return s * W0 * torch.einsum("ik,k,kj->ij", B, m, A)


def test_matches_dense_reference():
    model, handle = adapted("hira", rank=3, alpha=6)
    perturb(handle)
    for name, fin in (("fc1", 12), ("fc2", 16)):
        layer, f = getattr(model, name), _form(model, name)
        W0, b = layer.base.weight.detach(), layer.base.bias.detach()
        dW = _dense(W0, f.B.detach(), f.A.detach(), 6 / 3)
        x = layer_input(features=fin)
        torch.testing.assert_close(layer(x), x @ (W0 + dW).T + b, rtol=1e-6, atol=0)
        torch.testing.assert_close(f.delta_weight(W0), dW, rtol=1e-10, atol=1e-12)


def test_gradients_match_dense_autograd():
    """The custom backward (recomputing W0 ⊙ BA) against autograd through the dense formula."""
    model, handle, layer = single_layer("hira", rank=3, alpha=3)
    perturb(handle)
    f = layer.adapters["default"].form
    W0 = layer.base.weight.detach()
    x = layer_input(n=7, features=20).requires_grad_()
    g = layer_input(n=7, features=24, seed=4)
    (layer(x) * g).sum().backward()
    B, A = f.B.detach().clone().requires_grad_(), f.A.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ((x2 @ (W0 + W0 * (B @ A)).T) * g).sum().backward()  # s = alpha / r = 1
    for got, want in ((f.B.grad, B.grad), (f.A.grad, A.grad), (x.grad, x2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("with_base", [False, True])
def test_hadamard_update_gradcheck_on_3d_inputs(with_base):
    """x (W ⊙ s·BA)ᵀ (and with W folded in) through the shared dense function and HiRA's hand-written
    ∂/∂P and ∂/∂W, W included, against finite differences."""
    model, handle, layer = single_layer("hira", in_features=5, out_features=4, rank=2, alpha=3)
    form = layer.adapters["default"].form
    gen = torch.Generator().manual_seed(0)
    x, W, B, A = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                  for s in ((2, 3, 5), (4, 5), (4, 2), (2, 5)))
    mask = torch.tensor([2.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, W, B, A: DenseLinear.apply(x, form, W, B, A, mask, with_base),
                                    (x, W, B, A))


def test_starts_as_base_with_b_zero_and_b_learns_at_once():
    model, handle = adapted("hira", rank=4)
    f = _form(model)
    assert torch.count_nonzero(f.B) == 0 and torch.count_nonzero(f.A) == f.A.numel()
    assert torch.count_nonzero(f.delta_weight(model.fc2.linear_weight())) == 0
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)
    model(x).logits.sum().backward()
    assert torch.count_nonzero(f.B.grad) > 0
    assert handle.num_trainable() == 4 * (12 + 16) + 4 * (16 + 16)  # LoRA's parameter count


def test_update_is_high_rank():
    """rank(W0 ⊙ BA) <= rank(W0)·r, far above r: full rank on a random W0 with r = 1 or 2."""
    for r in (1, 2):
        model, handle = adapted("hira", rank=r)
        perturb(handle)
        W0 = model.fc2.linear_weight()
        dW = _form(model).delta_weight(W0)
        assert torch.linalg.matrix_rank(torch.einsum("ik,kj->ij", _form(model).B, _form(model).A)) == r
        assert torch.linalg.matrix_rank(dW) == 16  # min(out, in) = 16 > r


def test_rank_mask():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="hira", rank=6, rank_dropout=0.5, targets=["fc2"]))
    perturb(handle)
    f, W0, b = _form(model), model.fc2.base.weight.detach(), model.fc2.base.bias.detach()
    x = layer_input()
    seed, keep = rank_mask_draw(6, 0.5)
    torch.manual_seed(seed)
    out = model.fc2(x)  # training mode: the same mask is drawn
    ref = x @ (W0 + _dense(W0, f.B.detach(), f.A.detach(), f.scale, keep)).T + b
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_no_out_by_in_tensor_kept_for_backward_but_the_weight():
    model, handle, layer = single_layer("hira", rank=3)
    perturb(handle)
    f, W = layer.adapters["default"].form, layer.linear_weight()
    x = layer_input(features=20).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = f(x, torch.zeros(5, 24, dtype=torch.float64), W, None)
    big = [t for t in saved if t.shape in ((24, 20), (20, 24))]
    assert big and all(t.data_ptr() == W.data_ptr() for t in big)  # only W0 itself, by reference
    out.sum().backward()
    assert f.B.grad is not None and f.A.grad is not None


def test_merge_unmerge_exact_and_refused_when_an_entry_would_vanish():
    model, handle = adapted("hira", rank=3)
    perturb(handle, scale=1.0)
    x = layer_input(features=12)
    out = model(x).logits
    before = model.fc2.base.weight.detach().clone()
    handle.merge()
    W0 = before
    torch.testing.assert_close(model.fc2.base.weight.detach(),
                               W0 + _dense(W0, _form(model).B.detach(), _form(model).A.detach(), 16 / 3),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model(x).logits, out, rtol=1e-10, atol=1e-12)
    handle.unmerge()
    torch.testing.assert_close(model.fc2.base.weight.detach(), before, rtol=1e-13, atol=0)

    now = model.fc2.base.weight.detach().clone()
    for f in (_form(model, "fc1"), _form(model, "fc2")):
        with torch.no_grad():  # 1 + s·(BA)_00 = 0: W0_00 would be erased
            f.A.zero_()
            f.A[0, 0] = 1.0
            f.B.zero_()
            f.B[0, 0] = -1.0 / f.scale
    with pytest.raises(lorazoo.NotMergeableError, match="HiRA"):
        handle.merge()
    assert not handle.merged
    torch.testing.assert_close(model.fc2.base.weight.detach(), now, rtol=0, atol=0)


def test_constant_scale_is_the_authors_formula():
    """scale='constant', alpha=1: W' = W0 ⊙ (1 + BA), the official code's forward."""
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="hira", rank=2, scale="constant", alpha=1,
                                                      targets=["fc2"]))
    perturb(handle)
    f, W0, b = _form(model), model.fc2.base.weight.detach(), model.fc2.base.bias.detach()
    x = layer_input()
    torch.testing.assert_close(model.fc2(x), x @ (W0 * (1 + f.B.detach() @ f.A.detach())).T + b,
                               rtol=1e-10, atol=1e-12)


def test_on_a_conv_layer():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)).double()
    W0 = conv[0].weight.detach().clone()
    handle = lorazoo.adapt(conv, lorazoo.AdapterSpec(form="hira", rank=2, targets=["0"]))
    perturb(handle)
    f = conv[0].adapters["default"].form
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    W = W0.reshape(5, -1)
    Wp = (W + _dense(W, f.B.detach(), f.A.detach(), f.scale)).reshape(W0.shape)
    torch.testing.assert_close(conv(x), F.conv2d(x, Wp, conv[0].base.bias, padding=1), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(scale="rslora"), dict(optim="loraplus"), dict(rank_dropout=0.3),
                                 dict(dropout=0.1)])
def test_meaningful_combinations_train(kw):
    model, handle = adapted("hira", rank=4, **kw)
    losses = train(model, handle, steps=10, lr=3e-2)
    assert losses[-1] < losses[0]


def test_loraplus_puts_b_in_the_fast_group():
    model, handle = adapted("hira", rank=4, optim="loraplus")
    groups = {g["name"]: g for g in handle.param_groups(1e-3)}
    assert {id(p) for p in groups["B"]["params"]} == {id(_form(model, n).B) for n in ("fc1", "fc2")}


@pytest.mark.parametrize("kw, part", [(dict(init="pissa"), "pissa"), (dict(init="eva"), "eva"),
                                       (dict(init="lora_ga"), "lora_ga"), (dict(optim="lora_pro"), "lora_pro"),
                                       (dict(schedule="relora"), "relora")])
def test_meaningless_combinations_refused_at_spec(kw, part):
    with pytest.raises(lorazoo.SpecError, match=rf"(?s)'{part}'.*'hira'"):
        lorazoo.AdapterSpec(form="hira", **kw)
