"""DoRA (study Eq. 68, 135; DoRA [67]): W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_row, m (out,) trainable,
initialized to the row norms of W0; the norm per output row of the (out, in) weight."""
import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, perturb, rank_mask_draw, single_layer


def _dense(W0, B, A, m, s):
    """Eq. 68 in float64: m ⊙ V / ‖V‖ with V = W0 + s·BA, the norm over each output row."""
    V = W0 + s * B @ A
    return m[:, None] * V / torch.sqrt((V * V).sum(dim=1, keepdim=True))


def _parts(layer):
    form = layer.adapters["default"].form
    return form, layer.base.weight.detach(), layer.base.bias.detach()


def test_matches_dense_reference():
    model, handle = adapted("dora", rank=4, alpha=6)
    perturb(handle)
    for layer in (model.fc1, model.fc2):
        form, W0, b = _parts(layer)
        x = layer_input(features=W0.shape[1])
        ref = x @ _dense(W0, form.B.detach(), form.A.detach(), form.m.detach(), 6 / 4).T + b
        torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)
        assert form.delta_weight(W0).shape == W0.shape
        torch.testing.assert_close(W0 + form.delta_weight(W0),
                                   _dense(W0, form.B.detach(), form.A.detach(), form.m.detach(), 1.5),
                                   rtol=1e-6, atol=0)


def test_rank_mask_enters_the_norm():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="dora", rank=6, rank_dropout=0.5, targets=["fc2"]))
    perturb(handle)
    form, W0, b = _parts(model.fc2)
    x = layer_input()

    seed, keep = rank_mask_draw(6, 0.5)
    torch.manual_seed(seed)
    out = model.fc2(x)  # training mode: the same mask is drawn
    ref = x @ _dense(W0, form.B.detach() * keep, form.A.detach(), form.m.detach(), form.scale).T + b
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_starts_as_base_with_m_the_row_norms():
    base = TinyNet()
    model, handle = adapted("dora", rank=4)
    x = layer_input(features=12)
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-12, atol=0)
    for name in ("fc1", "fc2"):
        W0 = getattr(base, name).weight.detach()
        m = getattr(model, name).adapters["default"].form.m.detach()
        torch.testing.assert_close(m, torch.sqrt((W0 * W0).sum(1)), rtol=1e-12, atol=0)
    assert sum(p.numel() for p in handle.trainable_parameters()) == sum(
        4 * (i + o) + o for i, o in ((12, 16), (16, 16)))


def test_equals_lora_when_m_is_the_norm():
    """With m = ‖W0 + s·BA‖_row the rescale is 1 and DoRA is LoRA with the same B, A."""
    model, handle = adapted("dora", rank=3, alpha=5)
    perturb(handle)
    form, W0, b = _parts(model.fc2)
    B, A, s = form.B.detach(), form.A.detach(), 5 / 3
    with torch.no_grad():
        V = W0 + s * B @ A
        form.m.copy_(torch.sqrt((V * V).sum(1)))
    x = layer_input()
    torch.testing.assert_close(model.fc2(x), x @ (W0 + s * B @ A).T + b, rtol=1e-6, atol=0)
    # after_factor_init (run after every init, e.g. PiSSA's base shift) sets exactly this m
    with torch.no_grad():
        form.m.fill_(1.0)
    form.after_factor_init(model.fc2.linear_weight())
    torch.testing.assert_close(model.fc2(x), x @ (W0 + s * B @ A).T + b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("detach", [False, True])
def test_factorized_norm_gradient_matches_dense_autograd(detach):
    model, handle = adapted("dora", rank=4, alpha=6, dora_detach_norm=detach)
    perturb(handle)
    layer = model.fc2
    form, W0, b = _parts(layer)
    x = layer_input(n=7)
    target = torch.randn(7, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    ((layer(x) - target) ** 2).sum().backward()
    got = [form.B.grad, form.A.grad, form.m.grad]

    B, A, m = (t.detach().clone().requires_grad_(True) for t in (form.B, form.A, form.m))
    V = W0 + 1.5 * B @ A
    norm = torch.sqrt((V * V).sum(dim=1, keepdim=True))
    if detach:  # DoRA Sec. 4.3: the norm is a constant in backward
        norm = norm.detach()
    ref = x @ (m[:, None] * V / norm).T + b
    want = torch.autograd.grad(((ref - target) ** 2).sum(), [B, A, m])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12)
    if not detach:  # the two modes really differ
        V = W0 + 1.5 * B @ A
        detached = x @ (m[:, None] * V / torch.sqrt((V * V).sum(dim=1, keepdim=True)).detach()).T + b
        assert not torch.allclose(form.B.grad, torch.autograd.grad(((detached - target) ** 2).sum(), B)[0])


def test_merge_caches_norm_and_unmerges():
    model, handle = adapted("dora", rank=4)
    perturb(handle)
    form, W0, b = _parts(model.fc2)
    W_before = W0.clone()
    handle.merge()
    torch.testing.assert_close(model.fc2.base.weight.detach(),
                               _dense(W_before, form.B.detach(), form.A.detach(), form.m.detach(), form.scale),
                               rtol=1e-12, atol=0)
    assert form.merged_norm is not None and "merged_norm" not in form.state_dict()
    handle.unmerge()
    assert form.merged_norm is None
    torch.testing.assert_close(model.fc2.base.weight.detach(), W_before, rtol=1e-12, atol=1e-14)


def test_bad_option_refused():
    with pytest.raises(lorazoo.SpecError, match="dora_detach_norm"):
        lorazoo.AdapterSpec(form="dora", dora_detach_norm="yes")
    with pytest.raises(lorazoo.SpecError, match="dora_detach_norm"):
        lorazoo.AdapterSpec(form="lora", dora_detach_norm=False)  # an option of another form


def test_a_zero_weight_row_gives_no_nan_and_stays_zero():
    """A pruned unit (a zero row of W0): m and ‖V‖ are both 0 there; the row must stay 0, not 0/0."""
    model, handle, layer = single_layer("dora")
    with torch.no_grad():
        layer.base.weight[3].zero_()
        layer.base.bias.zero_()
    handle.delete()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="dora", rank=3, targets=["0"]))
    layer = model[0]
    x = layer_input(features=20)
    out = layer(x)
    assert torch.isfinite(out).all() and torch.count_nonzero(out[:, 3]) == 0
    torch.testing.assert_close(out, layer.base(x), rtol=1e-6, atol=1e-9)
    perturb(handle)
    out = layer(x)
    handle.merge()
    torch.testing.assert_close(layer(x), out, rtol=1e-6, atol=1e-9)
    handle.unmerge()


def test_merge_is_all_or_nothing():
    """When a later layer cannot merge (a zero magnitude), the layers merged before it are unmerged."""
    model, handle = adapted("dora", rank=2)
    perturb(handle)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    with torch.no_grad():
        model.fc2.adapters["default"].form.m[0] = 0.0
    with pytest.raises(lorazoo.NotMergeableError):
        handle.merge()
    assert not handle.merged
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=1e-12, atol=1e-12)
