"""CorDA (study Eq. 110-115, [84]): C = XᵀX/rows, C_d = C + δ·mean(diag C)·I, W0 C_d = U S Vᵀ;
B = U_k sqrt(S_k/s), A = sqrt(S_k/s) (Vᵀ C_d⁻¹)_k with k the r smallest (KPA) or largest (IPA)
triplets; base W0 - s·B·A. The reference below is written from these equations in float64."""
import pytest
import torch

import lorazoo
from lorazoo.inits.corda import damped_inverse
from lorazoo.registry import FORMS
from reference import column_signs
from tiny import TinyNet, adapted, calibration_batches, layer_input, op_shapes, tiny_data

R, ALPHA = 3, 6.0
S_LORA = ALPHA / R
DAMP = 0.01  # the authors' initial damping; float64 inverts at once on these inputs


def layer_inputs():
    """The inputs of fc1 and fc2 over the whole calibration set, computed directly."""
    x = torch.cat([b["x"] for b in calibration_batches()])
    net = TinyNet()
    with torch.no_grad():
        return {"fc1": x, "fc2": torch.tanh(net.fc1(x))}


def damped_cov(X):
    C = X.T @ X / X.shape[0]
    return C + DAMP * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)


def reference(W, X, r, s, mode):
    """Eq. 110-115 in (out, in) layout: factors, residual base and all singular values of W0 C_d."""
    Cd = damped_cov(X)
    U, S, Vh = torch.linalg.svd(W @ Cd, full_matrices=False)
    right = Vh @ torch.linalg.inv(Cd)  # W = U S (Vᵀ C_d⁻¹)
    n = S.shape[0]
    k = slice(n - r, n) if mode == "kpa" else slice(0, r)
    root = torch.sqrt(S[k] / s)
    B, A = U[:, k] * root, root[:, None] * right[k]
    return B, A, W - s * B @ A, S


def check_layer(lay, W0, X, s, mode):
    form = lay.adapters["default"].form
    B_ref, A_ref, residual, _ = reference(W0, X, form.rank, s, mode)
    sign = column_signs(form.B.detach(), B_ref)  # each singular pair flips together
    torch.testing.assert_close(form.B.detach() * sign, B_ref, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(form.A.detach() * sign[:, None], A_ref, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(lay.linear_weight().detach(), residual, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])  # fc1 is 12 -> 16 (tall), fc2 square
def test_factors_and_residual_match_reference(mode, layer):
    model, _ = adapted(rank=R, alpha=ALPHA, init="corda", corda_mode=mode, calibration=calibration_batches())
    check_layer(getattr(model, layer), getattr(TinyNet(), layer).weight.detach(), layer_inputs()[layer],
                S_LORA, mode)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_kpa_takes_smallest_ipa_largest_components(mode):
    """s·B·A·C_d carries exactly the chosen singular values of W0 C_d, the residual·C_d the others."""
    model, _ = adapted(rank=R, alpha=ALPHA, init="corda", corda_mode=mode, calibration=calibration_batches())
    for path, X in layer_inputs().items():
        W0 = getattr(TinyNet(), path).weight.detach()
        lay = getattr(model, path)
        Cd = damped_cov(X)
        S = torch.linalg.svdvals(W0 @ Cd)
        n = S.shape[0]
        chosen, rest = (S[n - R:], S[: n - R]) if mode == "kpa" else (S[:R], S[R:])
        delta = lay.adapters["default"].form.delta_weight(W0)
        torch.testing.assert_close(torch.linalg.svdvals(delta @ Cd)[:R], chosen, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(torch.linalg.svdvals(lay.linear_weight().detach() @ Cd)[: n - R], rest,
                                   rtol=1e-6, atol=1e-10)
        # the same values from the factors alone: B's squared column norms are S_k / s
        got = (lay.adapters["default"].form.B.detach().square().sum(0) * S_LORA).sort(descending=True).values
        torch.testing.assert_close(got, chosen, rtol=1e-6, atol=1e-10)
        assert (chosen.max() < rest.min()) if mode == "kpa" else (chosen.min() > rest.max())


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_starts_as_base_residual_plus_update_is_w0_and_delete_restores(mode):
    x, _ = tiny_data()
    base = TinyNet()
    model, handle = adapted(rank=R, alpha=ALPHA, init="corda", corda_mode=mode, calibration=calibration_batches())
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-6, atol=1e-12)
    for path in ("fc1", "fc2"):
        lay, W0 = getattr(model, path), getattr(base, path).weight.detach()
        W = lay.linear_weight().detach()
        torch.testing.assert_close(W + lay.adapters["default"].form.delta_weight(W), W0, rtol=1e-12, atol=1e-12)
    handle.delete()
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=n)


def test_training_step_runs_the_same_ops_as_lora():
    """An init only: the step is LoRA's (factored, no (out, in) update), the base shift costs nothing."""
    x, y = tiny_data()

    def step_shapes(**kw):
        model, _ = adapted(rank=R, alpha=ALPHA, **kw)
        model.train()
        return op_shapes(lambda: model(x=x, labels=y).loss.backward())

    corda = step_shapes(init="corda", calibration=calibration_batches())
    assert corda == step_shapes()
    assert (16, 12) not in corda  # fc1's dense update (out, in) is never formed


def test_presets_pick_the_modes():
    assert lorazoo.AdapterSpec.preset("corda").options["corda_mode"] == "ipa"
    assert lorazoo.AdapterSpec.preset("corda_kpa").options["corda_mode"] == "kpa"


def test_with_rslora_scale_is_accounted_for():
    """rsLoRA (named by the study with CorDA): the factors carry 1/s, so s·B·A is the same component."""
    X = layer_inputs()["fc2"]
    W0 = TinyNet().fc2.weight.detach()
    for alpha in (1.0, 32.0):
        model, _ = adapted(rank=R, alpha=alpha, init="corda", scale="rslora", calibration=calibration_batches())
        check_layer(model.fc2, W0, X, alpha / R ** 0.5, "ipa")
        x, _ = tiny_data()
        torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("form", [f for f in ("dora", "moslora") if f in FORMS.names()])
def test_with_other_factor_forms_starts_as_base(form):
    """DoRA: its magnitude is set from the residual + s·B·A = W0, so W' = W0 at the start."""
    x, _ = tiny_data()
    for mode in ("ipa", "kpa"):
        model, _ = adapted(form, rank=R, alpha=ALPHA, init="corda", corda_mode=mode,
                           calibration=calibration_batches())
        torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)
    if form == "dora":
        torch.testing.assert_close(model.fc2.adapters["default"].form.m.detach(),
                                   TinyNet().fc2.weight.detach().norm(dim=1), rtol=1e-10, atol=1e-12)


def test_conv1d_uses_the_out_in_view():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv1D(8, 6)).double()  # weight stored (in=6, out=8)
    W0 = net[0].weight.detach().T.clone()
    x = layer_input(20, 6)
    out = net(x)
    lorazoo.adapt(net, lorazoo.AdapterSpec(rank=2, alpha=4, init="corda", corda_mode="kpa", targets=["0"]),
                  calibration=[{"input": x[:10]}, {"input": x[10:]}])
    check_layer(net[0], W0, x, 2.0, "kpa")
    torch.testing.assert_close(net(x), out, rtol=1e-6, atol=1e-12)


def test_damping_doubles_until_the_inverse_is_accurate():
    """A rank-1 float32 covariance with a tiny damping cannot be inverted accurately: δ doubles."""
    v = torch.arange(1.0, 9.0)
    C = torch.outer(v, v)
    fixed, inverse, damp = damped_inverse(C, 1e-9)
    eye = torch.eye(8)
    level = C.diagonal().mean()
    assert damp > 1e-9
    torch.testing.assert_close(fixed, C + damp * level * eye)
    assert torch.dist(fixed @ inverse, eye) < 0.05
    half = C + damp / 2 * level * eye  # the previous try failed the authors' check
    assert torch.dist(half @ torch.linalg.inv(half), eye) >= 0.05
    _, _, damp = damped_inverse(C.double() + torch.eye(8, dtype=torch.float64), 0.01)
    assert damp == 0.01  # a well-conditioned one is damped once, by the initial δ
    with pytest.raises(lorazoo.SpecError, match="zero"):
        damped_inverse(torch.zeros(4, 4), 0.01)
    with pytest.raises(lorazoo.SpecError, match="nan"):
        damped_inverse(torch.full((4, 4), float("nan")), 0.01)


def test_a_layer_with_zero_inputs_is_refused_before_the_model_changes():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).double()
    spec = lorazoo.AdapterSpec(init="corda", rank=2, targets=["0"])
    with pytest.raises(lorazoo.SpecError, match="'0'.*zero"):
        lorazoo.adapt(net, spec, calibration=[{"input": torch.zeros(5, 4, dtype=torch.float64)}])
    assert not any(type(m).__name__ == "AdaptedLayer" for m in net.modules())


def test_refusals():
    for bad in ("IPA", "ipm", None):
        with pytest.raises(lorazoo.SpecError, match="corda_mode"):
            lorazoo.AdapterSpec(init="corda", corda_mode=bad)
    for bad in (0, -0.1, float("nan"), "x"):
        with pytest.raises(lorazoo.SpecError, match="corda_damp"):
            lorazoo.AdapterSpec(init="corda", corda_damp=bad)
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError, match="calibration"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(init="corda", targets=["fc1"]))
    assert not any(type(m).__name__ == "AdaptedLayer" for m in model.modules())


@pytest.mark.parametrize("form", [f for f in ("vera", "loha", "lokr", "lorma_plus") if f in FORMS.names()])
def test_form_without_plain_factors_is_refused(form):
    with pytest.raises(lorazoo.SpecError, match=f"corda.*{form}"):
        lorazoo.AdapterSpec(form=form, init="corda")
