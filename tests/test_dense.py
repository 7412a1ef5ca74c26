"""Dense updates (lorazoo.forms.dense): the shared autograd function against finite differences, and the
layer's fused path x (W0 + ΔW)ᵀ for HiRA, Sine-LoRA and LoRAN: one matmul instead of two, the same output
and gradients as the base plus the update, nothing of size (out, in) kept for backward but W0, and the
two-matmul path wherever the base must see another input (input dropout) or another adapter runs.
Each form's ΔW is checked against its paper in its own test file."""
import pytest
import torch
import torch.nn.functional as F

import lorazoo
from lorazoo.forms.dense import DenseLinear
from tiny import layer_input, perturb, single_layer

DENSE = {"hira": {}, "sinelora": {"sinelora_frequency": 3.0}, "loran": {"loran_amplitude": 0.5, "loran_frequency": 4.0}}


@pytest.mark.parametrize("form", sorted(DENSE))
@pytest.mark.parametrize("with_base", [False, True])
def test_dense_linear_gradcheck_with_and_without_a_mask(form, with_base):
    """Each form's hand-written ∂u/∂P through the shared function, the base folded in or not, against finite
    differences (W frozen, as under an adapter)."""
    _, _, layer = single_layer(form, in_features=5, out_features=4, rank=2, **DENSE[form])
    f = layer.adapters["default"].form
    gen = torch.Generator().manual_seed(0)
    x, B, A = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) * 0.5
               for s in ((2, 3, 5), (4, 2), (2, 5)))
    x, B, A = (t.detach().requires_grad_() for t in (x, B, A))
    W = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    for mask in (None, torch.tensor([2.0, 0.0], dtype=torch.float64)):
        assert torch.autograd.gradcheck(lambda x, B, A: DenseLinear.apply(x, f, W, B, A, mask, with_base), (x, B, A))


def _linear_calls(monkeypatch):
    calls = []
    linear = F.linear

    def counting(x, w, b=None):
        calls.append(tuple(w.shape))
        return linear(x, w, b)

    monkeypatch.setattr(F, "linear", counting)
    return calls


@pytest.mark.parametrize("form", sorted(DENSE))
def test_alone_on_a_layer_the_base_matmul_is_folded_in(form, monkeypatch):
    model, handle, layer = single_layer(form, **DENSE[form])
    perturb(handle)
    f = layer.adapters["default"].form
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    x = layer_input(n=7, features=20).requires_grad_()
    g = layer_input(n=7, features=24, seed=4)
    calls = _linear_calls(monkeypatch)
    out = layer(x)
    (out * g).sum().backward()
    assert calls == [(24, 20)]  # one matmul with W0 + ΔW, no separate x W0ᵀ
    monkeypatch.undo()

    got = {"x": x.grad, "B": f.B.grad, "A": f.A.grad}
    f.B.grad = f.A.grad = None
    # the two-matmul reference: the base, plus the update through the form's own forward (its file
    # checks it against the paper's ΔW)
    x2 = x.detach().clone().requires_grad_()
    ref = f(x2, F.linear(x2, W0, b), W0, None)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, want in (("x", x2.grad), ("B", f.B.grad), ("A", f.A.grad)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", sorted(DENSE))
def test_fused_path_keeps_no_out_by_in_tensor_but_the_weight(form):
    model, handle, layer = single_layer(form, **DENSE[form])
    perturb(handle)
    W = layer.linear_weight()
    x = layer_input(features=20).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    big = [t for t in saved if t.shape in ((24, 20), (20, 24))]
    assert all(t.data_ptr() == W.data_ptr() for t in big)  # W0 by reference only
    out.sum().backward()


def test_two_matmuls_where_the_base_sees_another_input_or_another_adapter_runs(monkeypatch):
    # input dropout in training: the base reads x, the update reads dropout(x)
    model, handle, layer = single_layer("hira", dropout=0.5)
    perturb(handle)
    x = layer_input(features=20)
    calls = _linear_calls(monkeypatch)
    layer.train()
    layer(x)
    assert len(calls) == 2
    calls.clear()
    layer.eval()  # dropout is the identity in eval: folded again
    out = layer(x)
    assert len(calls) == 1
    monkeypatch.undo()
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    ref = F.linear(x, W0 + layer.adapters["default"].form.delta_weight(W0), b)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)

    # a second running adapter: each adds its own update to the base's
    lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets=["0"]), name="second")
    lorazoo.activate(model, "default", "second")
    model.eval()
    calls = _linear_calls(monkeypatch)
    layer(x)
    assert (24, 20) in calls and len(calls) >= 3  # the base, HiRA's update, LoRA's two small ones


@pytest.mark.parametrize("form", sorted(DENSE))
def test_autocast_bf16_step_follows_the_float32_one(form):
    """Under CPU autocast the layer keeps the two-matmul path (the fold is skipped) and the dense function
    casts its gradient to ΔW's dtype: the bf16 step's gradients are the float32 ones up to bf16 rounding."""
    grads = []
    for autocast in (False, True):
        model, handle, layer = single_layer(form, **DENSE[form])
        model.float()
        perturb(handle)
        x = layer_input(n=7, features=20, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        out.float().square().sum().backward()
        grads.append([p.grad.clone() for p in handle.trainable_parameters()])
    for want, got in zip(*grads):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got - want).norm() <= 0.05 * want.norm()
