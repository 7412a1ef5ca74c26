"""LoRMA (papers/lorma.txt): multiplicative updates W' = M·W0 with B (d, r), A (r, d), d = out:
Eq. 6 M = s·BA; Eq. 8 M = s·BA + I; Eq. 7 M = s·I_pi(BA), row i of BA rotated cyclically by i
(the factor s = alpha/r as in the authors' code; Eq. 7 itself is the s = 1 case)."""
import pytest
import torch

import lorazoo
from lorazoo.parts import Init
from tiny import TinyNet, adapted, layer_input, perturb, rank_mask_draw, train


def rotate_rows(P):
    """I_pi from Sec. 3.2.1, elementwise: row i rotated right by i (row 0 by 0, row 1 by 1 ...)."""
    d = P.shape[0]
    out = torch.empty_like(P)
    for i in range(d):
        for j in range(d):
            out[i, (j + i) % d] = P[i, j]
    return out


def multiplier(form_name, B, A, s):
    d = B.shape[0]
    if form_name == "lorma":
        return s * B @ A                               # Eq. 6
    if form_name == "lorma_plus":
        return s * B @ A + torch.eye(d, dtype=B.dtype)  # Eq. 8
    return s * rotate_rows(B @ A)                       # Eq. 7, authors' s


def _parts(layer):
    form = layer.adapters["default"].form
    return form, layer.base.weight.detach(), layer.base.bias.detach()


@pytest.mark.parametrize("name", ["lorma", "lorma_plus", "lorma_pi"])
def test_matches_dense_reference(name):
    model, handle = adapted(name, rank=3, alpha=5)
    perturb(handle)
    for layer in (model.fc1, model.fc2):  # fc1 is 12 -> 16: B (16, 3), A (3, 16)
        form, W0, b = _parts(layer)
        assert form.A.shape == (3, 16) and form.B.shape == (16, 3)
        M = multiplier(name, form.B.detach(), form.A.detach(), 5 / 3)
        x = layer_input(features=W0.shape[1])
        torch.testing.assert_close(layer(x), x @ (M @ W0).T + b, rtol=1e-6, atol=0)
        if name == "lorma_pi":  # the same through the FFT path (chosen by size; forced here)
            form.fft_min_features = 1
        torch.testing.assert_close(layer(x), x @ (M @ W0).T + b, rtol=1e-6, atol=0)
        torch.testing.assert_close(W0 + form.delta_weight(W0), M @ W0, rtol=1e-6, atol=1e-12)


def test_rotation_follows_the_paper_figure():
    """Fig. 3: a rank-1 matrix becomes full rank; a ones first column becomes the identity."""
    from lorazoo.forms.lorma import inflate_pi

    u, v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    P = torch.outer(u, v)
    assert torch.equal(inflate_pi(P), rotate_rows(P))
    assert torch.linalg.matrix_rank(P) == 1 and torch.linalg.matrix_rank(inflate_pi(P)) == 3
    P = torch.zeros(5, 5, dtype=torch.float64)
    P[:, 0] = 1
    assert torch.equal(inflate_pi(P), torch.eye(5, dtype=torch.float64))
    R = torch.randn(7, 7, dtype=torch.float64)
    assert torch.equal(inflate_pi(R), rotate_rows(R))


@pytest.mark.parametrize("alpha", [4, 16])
def test_lorma_pi_is_identity_at_init(alpha):
    """Sec. 3.2.1 init, with the authors' 1/sqrt(s) on both factors: s·I_pi(BA) = I. Exact for
    s = 1 (alpha = r); within one rounding otherwise. The model output equals the base's within
    rounding (the adapted layer adds the bias after the matmul, the base fuses it)."""
    base = TinyNet()
    model, handle = adapted("lorma_pi", rank=4, alpha=alpha)
    s = alpha / 4
    x = layer_input(features=12)
    for name in ("fc1", "fc2"):
        form = getattr(model, name).adapters["default"].form
        torch.testing.assert_close(form.B[:, 0], torch.full((16,), s ** -0.5, dtype=torch.float64), rtol=0, atol=0)
        assert torch.count_nonzero(form.B[:, 1:]) == 16 * 3      # the rest random
        assert torch.count_nonzero(form.A) == 1 and form.A[0, 0] == s ** -0.5
        eye = torch.eye(16, dtype=torch.float64)
        if s == 1:
            assert torch.equal(form.matrix(), eye)
        torch.testing.assert_close(form.matrix(), eye, rtol=0, atol=1e-15)
        y = layer_input(features=16, seed=5)
        torch.testing.assert_close(form(y, y, None), y, rtol=1e-15, atol=1e-15)
        form.fft_min_features = 1
        torch.testing.assert_close(form(y, y, None), y, rtol=0, atol=1e-14)
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-13, atol=1e-13)


def test_lorma_plus_identity_at_init_and_lorma_not():
    base = TinyNet()
    x = layer_input(features=12)
    model, handle = adapted("lorma_plus", rank=4)
    form = model.fc2.adapters["default"].form
    assert torch.count_nonzero(form.B) == 0 and torch.count_nonzero(form.A) == form.A.numel()
    assert torch.equal(form.matrix(), torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-12, atol=0)
    plain, _ = adapted("lorma", rank=4)
    assert not plain.fc2.adapters["default"].form.zero_init
    assert not torch.allclose(plain(x).logits, base(x).logits)


def test_rank_bounds_after_training():
    """LoRMA Table 15: LoRMA+'s s·BA (and ΔW = s·BA·W0) keeps rank <= r; LoRMA-pi's
    I_pi(BA) - I becomes (nearly) full rank. Eq. 6 without inflation: rank(W') <= r."""
    r, d = 3, 16
    ranks = {}
    for name in ("lorma_plus", "lorma_pi", "lorma"):
        model, handle = adapted(name, rank=r)
        losses = train(model, handle, steps=20, lr=1e-2)
        assert losses[-1] < losses[0]
        form, W0, _ = _parts(model.fc2)
        with torch.no_grad():
            M = form.matrix()
            update = M - torch.eye(d, dtype=M.dtype) if name != "lorma" else M
            ranks[name] = (int(torch.linalg.matrix_rank(update)),
                           int(torch.linalg.matrix_rank(form.delta_weight(W0))))
    assert ranks["lorma_plus"][0] <= r and ranks["lorma_plus"][1] <= r
    assert ranks["lorma_pi"][0] >= d - 1 and ranks["lorma_pi"][1] >= d - 1
    assert ranks["lorma"][0] <= r and ranks["lorma"][0] > 0


def test_rank_mask_between_A_and_B():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="lorma_pi", rank=6, rank_dropout=0.5, targets=["fc2"]))
    perturb(handle)
    form, W0, b = _parts(model.fc2)
    x = layer_input()

    seed, keep = rank_mask_draw(6, 0.5)
    torch.manual_seed(seed)
    out = model.fc2(x)
    M = form.scale * rotate_rows(form.B.detach() @ torch.diag(keep) @ form.A.detach())
    torch.testing.assert_close(out, x @ (M @ W0).T + b, rtol=1e-6, atol=0)
    form.fft_min_features = 1
    torch.manual_seed(seed)
    torch.testing.assert_close(model.fc2(x), x @ (M @ W0).T + b, rtol=1e-6, atol=1e-12)


def test_lorma_pi_dropout_falls_on_the_update_only():
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="lorma_pi", rank=4, dropout=0.5, targets=["fc2"]))
    perturb(handle)
    form, W0, b = _parts(model.fc2)
    x = layer_input()
    torch.manual_seed(4)
    out = model.fc2(x)
    y = x @ W0.T
    torch.manual_seed(4)
    dropped = torch.nn.functional.dropout(y, 0.5)
    M = form.scale * rotate_rows(form.B.detach() @ form.A.detach())
    ref = y + dropped @ (M - torch.eye(16, dtype=M.dtype)).T + b
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-12)
    form.fft_min_features = 1
    torch.manual_seed(4)
    torch.testing.assert_close(model.fc2(x), ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("fft", [False, True])
def test_lorma_pi_gradient_through_rotation(fft):
    model, handle = adapted("lorma_pi", rank=3)
    perturb(handle)
    form, W0, b = _parts(model.fc2)
    if fft:
        form.fft_min_features = 1
    x = layer_input(n=6)
    model.fc2(x).square().sum().backward()
    B, A = (t.detach().clone().requires_grad_(True) for t in (form.B, form.A))
    ref = x @ (form.scale * rotate_rows(B @ A) @ W0).T + b
    gB, gA = torch.autograd.grad(ref.square().sum(), [B, A])
    torch.testing.assert_close(form.B.grad, gB, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(form.A.grad, gA, rtol=1e-6, atol=1e-12)


def test_fft_product_matches_the_rotated_matrix():
    """I_pi(BA)·y by circular correlation (FFT) against the elementwise I_pi, float64 and float32,
    odd and even d, batched leading dimensions; bfloat16 input is computed in float32."""
    from lorazoo.forms.lorma import pi_apply_fft

    g = torch.Generator().manual_seed(0)
    for d, r in ((16, 3), (17, 4), (30, 1)):
        B, A = torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(r, d, generator=g, dtype=torch.float64)
        y = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
        ref = y @ rotate_rows(B @ A).T
        torch.testing.assert_close(pi_apply_fft(B, A, y), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pi_apply_fft(B.float(), A.float(), y.float()), ref.float(), rtol=1e-4, atol=1e-4)
        out = pi_apply_fft(B.bfloat16(), A.bfloat16(), y.bfloat16())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_lorma_pi_never_forms_d_by_d_on_the_fft_path():
    from tiny import op_shapes, single_layer

    model, handle, layer = single_layer("lorma_pi", in_features=20, out_features=24, rank=3)
    perturb(handle)
    x = layer_input(n=5, features=20)
    assert (24, 24) in op_shapes(lambda: layer(x).sum().backward())  # the dense path (small d)
    layer.adapters["default"].form.fft_min_features = 1
    assert (24, 24) not in op_shapes(lambda: layer(x).sum().backward())


@pytest.mark.parametrize("name", ["lorma", "lorma_plus", "lorma_pi"])
def test_merge_is_M_W0_and_unmerge_restores(name):
    model, handle = adapted(name, rank=4)
    perturb(handle)
    form, W0, _ = _parts(model.fc2)
    W_before = W0.clone()
    M = multiplier(name, form.B.detach(), form.A.detach(), form.scale)
    handle.merge()
    torch.testing.assert_close(model.fc2.base.weight.detach(), M @ W_before, rtol=1e-10, atol=1e-12)
    handle.unmerge()
    torch.testing.assert_close(model.fc2.base.weight.detach(), W_before, rtol=1e-10, atol=1e-12)
    assert "merged_from" not in form.state_dict()


def test_shapes_ranks_and_refusals():
    # rank bound is d = out features: fc1 (12 -> 16) takes rank 14 > in features
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec(form="lorma_pi", rank=14, targets=["fc1"]))
    with pytest.raises(lorazoo.SpecError, match="at most 16"):
        lorazoo.adapt(TinyNet(), lorazoo.AdapterSpec(form="lorma_plus", rank=17, targets=["fc2"]))

    class FactorInit(Init):  # any init that sets plain B·A factors (PiSSA-like)
        part_name = "factor-init"
        needs_factors = True

    from lorazoo.registry import FORMS
    for name in ("lorma", "lorma_plus", "lorma_pi"):
        with pytest.raises(lorazoo.SpecError, match="factors"):
            FactorInit.check_form(FORMS.get(name).obj)
    FactorInit.check_form(FORMS.get("dora").obj)  # DoRA has plain factors
