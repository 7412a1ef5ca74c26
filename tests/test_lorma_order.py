"""LoRMA's order option (papers/lorma.txt Sec. 5.3, Table 7, Corollary 1.2): ``lorma_order="post"``
gives W' = W0·M with M over the input features (B (d_in, r), A (r, d_in)), so h = W0 (M x) + b;
the default "pre" is the paper's W' = M·W0 with M over the output features."""
import pytest
import torch

import lorazoo
from lorazoo.registry import FORMS
from test_lorma import multiplier, rotate_rows
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, rank_mask_draw, single_layer, train

FORMS_ = ["lorma", "lorma_plus", "lorma_pi"]


def weights(layer):
    form = layer.adapters["default"].form
    return form, layer.base.weight.detach(), layer.base.bias.detach()


def reference_weight(name, form, W0, order):
    """W' from the paper's equations, with M built here from the factors (Eq. 6, 8, 7)."""
    M = multiplier(name, form.B.detach(), form.A.detach(), form.scale)
    return W0 @ M if order == "post" else M @ W0


@pytest.mark.parametrize("order", ["pre", "post"])
@pytest.mark.parametrize("name", FORMS_)
def test_matches_dense_reference_on_a_non_square_layer(name, order):
    """20 -> 24 layer: the multiplier is over d_in = 20 (post) or d_out = 24 (pre)."""
    model, handle, layer = single_layer(name, in_features=20, out_features=24, rank=3, alpha=5,
                                        lorma_order=order)
    perturb(handle)
    form, W0, b = weights(layer)
    d = 20 if order == "post" else 24
    assert form.A.shape == (3, d) and form.B.shape == (d, 3)
    assert (form.in_features, form.out_features) == (20, 24)
    Wp = reference_weight(name, form, W0, order)
    x = layer_input(n=6, features=20)
    torch.testing.assert_close(layer(x), x @ Wp.T + b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(W0 + form.delta_weight(W0), Wp, rtol=1e-9, atol=1e-12)
    if name == "lorma_pi":  # the same through the FFT path (chosen by size; forced here)
        form.fft_min_features = 1
        torch.testing.assert_close(layer(x), x @ Wp.T + b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", FORMS_)
def test_post_on_tinynet_both_layers(name):
    """fc1 (12 -> 16) gets a (12, 12) multiplier, fc2 (16 -> 16) a (16, 16) one; the model's
    output is the dense W0·M reference layer by layer."""
    model, handle = adapted(name, rank=3, alpha=5, lorma_order="post")
    perturb(handle)
    x = layer_input(features=12)
    h = x
    for layer in (model.fc1, model.fc2):
        form, W0, b = weights(layer)
        assert form.A.shape == (3, W0.shape[1])
        h_ref = h @ reference_weight(name, form, W0, "post").T + b
        torch.testing.assert_close(layer(h), h_ref, rtol=1e-9, atol=1e-12)
        h = torch.tanh(h_ref)
    torch.testing.assert_close(model(x).logits, h @ model.head.weight.T + model.head.bias, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [4, 16])
@pytest.mark.parametrize("name", ["lorma_plus", "lorma_pi"])
def test_post_starts_as_the_base(name, alpha):
    base = TinyNet()
    x = layer_input(features=12)
    model, handle = adapted(name, rank=4, alpha=alpha, lorma_order="post")
    for layer in (model.fc1, model.fc2):
        form, W0, _ = weights(layer)
        torch.testing.assert_close(form.matrix(), torch.eye(W0.shape[1], dtype=W0.dtype), rtol=0, atol=1e-15)
    tol = 0 if (name == "lorma_plus" or alpha == 4) else 1e-13  # s·I_pi(BA) = I within one rounding
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=tol, atol=tol)


def test_post_flags_are_per_instance():
    """A post form reads x (not W0 x): not multiplicative for the layer; plain LoRMA replaces y,
    so it reads the output (bias added after it); the classes keep the pre flags."""
    flags = {}
    for name in FORMS_:
        for order in ("pre", "post"):
            _, _, layer = single_layer(name, rank=2, lorma_order=order)
            form = layer.adapters["default"].form
            flags[name, order] = (form.multiplicative, form.reads_output)
        cls = FORMS.get(name).obj
        assert cls.multiplicative and cls.reads_output  # class-level refusals (LoRA-FA, ReLoRA...) still hold
    assert all(flags[n, "pre"] == (True, True) for n in FORMS_)
    assert flags["lorma", "post"] == (False, True)
    assert flags["lorma_plus", "post"] == flags["lorma_pi", "post"] == (False, False)
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(form="lorma_plus", optim="lora_fa", lorma_order="post")


@pytest.mark.parametrize("name", FORMS_)
def test_post_merge_is_W0_M_and_unmerge_restores(name):
    model, handle, layer = single_layer(name, in_features=20, out_features=24, rank=4, lorma_order="post")
    perturb(handle)
    form, W0, _ = weights(layer)
    W_before = W0.clone()
    Wp = reference_weight(name, form, W_before, "post")
    x = layer_input(n=6, features=20)
    out = layer(x)
    handle.merge()
    torch.testing.assert_close(layer.base.weight.detach(), Wp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-12)
    handle.unmerge()
    torch.testing.assert_close(layer.base.weight.detach(), W_before, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-12)
    if name == "lorma_plus":  # W' = W0·M is solved back (M invertible), not cached
        assert form.merged_from is None


@pytest.mark.parametrize("name", FORMS_)
def test_post_save_load_rebuilds_the_same_shapes(name, tmp_path):
    model, handle = adapted(name, rank=3, lorma_order="post")
    train(model, handle, steps=3, lr=1e-2)
    x = layer_input(features=12)
    out = model(x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    assert loaded.spec.options["lorma_order"] == "post"
    assert fresh.fc1.adapters["default"].form.A.shape == (3, 12)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FORMS_)
def test_post_training_lowers_loss(name):
    model, handle = adapted(name, rank=3, lorma_order="post")
    losses = train(model, handle, steps=30, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", FORMS_)
def test_post_gradient_matches_the_dense_reference(name):
    model, handle, layer = single_layer(name, in_features=20, out_features=24, rank=3, alpha=6,
                                        lorma_order="post")
    perturb(handle)
    form, W0, b = weights(layer)
    x = layer_input(n=6, features=20)
    layer(x).square().sum().backward()
    B, A = (t.detach().clone().requires_grad_(True) for t in (form.B, form.A))
    s = form.scale
    M = {"lorma": s * B @ A, "lorma_plus": s * B @ A + torch.eye(20, dtype=B.dtype),
         "lorma_pi": s * rotate_rows(B @ A)}[name]
    gB, gA = torch.autograd.grad((x @ (W0 @ M).T + b).square().sum(), [B, A])
    torch.testing.assert_close(form.B.grad, gB, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(form.A.grad, gA, rtol=1e-9, atol=1e-12)


def test_post_lorma_plus_never_forms_a_d_by_d_or_out_by_in_update():
    """W0·s·B(A x) runs as s·(W0 B)(A x): no (d_in, d_in) multiplier, no (out, in) product."""
    model, handle, layer = single_layer("lorma_plus", in_features=20, out_features=24, rank=3, lorma_order="post")
    perturb(handle)
    shapes = op_shapes(lambda: layer(layer_input(n=5, features=20)).sum().backward())
    assert (24, 3) in shapes and (20, 20) not in shapes and (24, 20) not in shapes


@pytest.mark.parametrize("name", FORMS_)
def test_post_rank_mask_between_A_and_B(name):
    model, handle, layer = single_layer(name, in_features=20, out_features=24, rank=6, rank_dropout=0.5,
                                        lorma_order="post")
    perturb(handle)
    model.train()
    form, W0, b = weights(layer)
    x = layer_input(n=6, features=20)
    seed, keep = rank_mask_draw(6, 0.5)
    M = multiplier(name, form.B.detach() @ torch.diag(keep), form.A.detach(), form.scale)
    torch.manual_seed(seed)
    torch.testing.assert_close(layer(x), x @ (W0 @ M).T + b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", FORMS_)
def test_post_input_dropout_falls_on_x(name):
    """Pre order drops out the multiplier's input W0 x; post drops out its input x. LoRMA+ and
    LoRMA-pi: h = W0 x + W0 (M - I) drop(x) + b (dropout on the update only, as LoRA and pre
    LoRMA-pi); plain LoRMA: h = W0 M drop(x) + b (its whole output, as in pre order)."""
    model, handle, layer = single_layer(name, in_features=20, out_features=24, rank=4, dropout=0.5,
                                        lorma_order="post")
    perturb(handle)
    model.train()
    form, W0, b = weights(layer)
    x = layer_input(n=6, features=20)
    torch.manual_seed(4)
    out = layer(x)
    torch.manual_seed(4)
    dropped = torch.nn.functional.dropout(x, 0.5)
    M = multiplier(name, form.B.detach(), form.A.detach(), form.scale)
    if name == "lorma":
        ref = dropped @ (W0 @ M).T + b
    else:
        ref = x @ W0.T + dropped @ (W0 @ (M - torch.eye(20, dtype=M.dtype))).T + b
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)


def test_order_refusals_and_rank_limit():
    for bad in ("left", "Post", None, 1):
        with pytest.raises(lorazoo.SpecError, match="lorma_order must be one of pre, post"):
            lorazoo.AdapterSpec(form="lorma_pi", lorma_order=bad)
    with pytest.raises(lorazoo.SpecError, match="lorma_order"):  # an option of the LoRMA forms only
        lorazoo.AdapterSpec(form="lora", lorma_order="post")
    # post: rank <= d_in (20); pre: rank <= d_out (24); refused before the model changes
    single_layer("lorma_plus", in_features=20, out_features=24, rank=20, lorma_order="post")
    single_layer("lorma_plus", in_features=20, out_features=24, rank=22)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 24)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError, match="at most 20"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="lorma_plus", rank=21, targets=["0"], lorma_order="post"))
    assert type(model[0]) is torch.nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_post_plus_and_pi_serve_per_sample_and_pre_is_refused():
    """Post LoRMA+ and LoRMA-pi add a fixed ΔW = W0 (M - I) to the layer's output, so per-sample
    serving (lorazoo.mixed) runs them: LoRMA+ through its rank-r factors (s·W0 B, A), alone on a
    layer, LoRMA-pi (and a layer mixing both) through delta_weight; the pre forms transform the
    output and are refused, as is post plain LoRMA (its output replaces y)."""
    from lorazoo.mixed import mixed_batch

    for forms in ({"p": "lorma_plus"}, {"p": "lorma_plus", "q": "lorma_pi"}):
        model = TinyNet()
        for i, (name, form) in enumerate(forms.items()):
            perturb(lorazoo.adapt(model, lorazoo.AdapterSpec(form=form, rank=3, targets=["fc1", "fc2"],
                                                             lorma_order="post"), name=name), seed=7 + i)
        model.eval()
        names = [n for n in ["p", None, "q", "p", "q"] if n is None or n in forms]
        x = layer_input(n=len(names), features=12)
        with torch.no_grad():
            want = []
            for i, n in enumerate(names):
                lorazoo.activate(model, *([n] if n else []))
                want.append(model(x[i:i + 1]).logits)
            with mixed_batch(model, names):
                got = model(x).logits
            assert (model.fc2.__dict__.get("_mixed_stack") is not None) == (len(forms) == 1)  # factored stacks kept
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(want[0], TinyNet()(x[:1]).logits)  # p is not the base
    for form, order in (("lorma_plus", "pre"), ("lorma", "post")):
        other = TinyNet()
        lorazoo.adapt(other, lorazoo.AdapterSpec(form=form, rank=3, targets=["fc2"], lorma_order=order), name="r")
        other.eval()
        with pytest.raises(lorazoo.SpecError, match="cannot run per sample"):
            with mixed_batch(other, ["r"]):
                pass


@pytest.mark.parametrize("name", ["lorma_plus", "lorma_pi"])
def test_post_on_a_conv_matches_its_merged_conv(name):
    """On a Conv2d the layer is a linear map on patches, (out, in·k·k): the post multiplier is over
    the in·k·k patch features; the conv with W0·M as weight gives the same output."""
    from test_conv import conv_net, dense_reference, images

    model = conv_net(3, 1, 1, True)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form=name, rank=2, targets=["0"], lorma_order="post"))
    perturb(handle, scale=0.2)
    layer, x = model[0], images()
    form, W0 = layer.adapters["default"].form, layer.linear_weight().detach()
    assert form.A.shape == (2, 4 * 9)
    Wp = reference_weight(name, form, W0, "post")
    torch.testing.assert_close(layer(x), dense_reference(layer.base, Wp - W0, x), rtol=1e-10, atol=1e-10)
    out = model(x)
    handle.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-9, atol=1e-9)
    handle.unmerge()
    torch.testing.assert_close(layer.base.weight.detach().reshape(6, -1), W0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FORMS_)
def test_post_on_a_quantized_base_equals_it_on_the_dequantized_weights(name):
    """int8 (bitsandbytes, skipped without it): the post form gets the dequantized W0 as for pre."""
    from lorazoo import qbase
    from test_quantize import data, dense_twin, net

    if not qbase.available("bitsandbytes"):
        pytest.skip("bitsandbytes is not installed (lorazoo[quant])")
    q = lorazoo.quantize(net(), "int8", "bitsandbytes")
    d = dense_twin(q, "bitsandbytes")
    spec = lorazoo.AdapterSpec(form=name, rank=4, targets=["fc1", "fc2"], lorma_order="post")
    hq, hd = lorazoo.adapt(q, spec), lorazoo.adapt(d, spec)
    perturb(hq, 0.2)
    perturb(hd, 0.2)
    x, y = data(n=8)
    lq, ld = q(x=x, labels=y), d(x=x, labels=y)
    torch.testing.assert_close(lq.logits, ld.logits, rtol=1e-4, atol=1e-5)
    lq.loss.backward()
    ld.loss.backward()
    gq, gd = dict(hq.named_trainable_parameters()), dict(hd.named_trainable_parameters())
    for k in gq:
        torch.testing.assert_close(gq[k].grad, gd[k].grad, rtol=1e-3, atol=1e-5, msg=k)
