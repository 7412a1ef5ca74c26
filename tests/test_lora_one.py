"""LoRA-One (study Eq. 104-106, [82]): -G = U S Vᵀ, S <- S/sigma_1, B = U_r S_r^1/2/sqrt(gamma),
A = S_r^1/2 V_rᵀ/sqrt(gamma); the base is not shifted, so the model starts at the one-step update
W0 - s/(gamma·sigma_1)·G_r, not at the base."""
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo.registry import FORMS, INITS
from reference import assert_columns_match
from test_lora_ga import autograd_mean_grad
from tiny import TinyNet, adapted, calibration_batches, tiny_data

R, ALPHA, GAMMA = 3, 6.0, 4.0
S_LORA = ALPHA / R


def reference(G, r, gamma=GAMMA):
    """Eq. 104-106 in (out, in) layout, from a float64 SVD of -G."""
    U, S, Vh = torch.linalg.svd(-G, full_matrices=False)
    S = S / S[0]
    root = S[:r].sqrt() / math.sqrt(gamma)
    return U[:, :r] * root, root[:, None] * Vh[:r], (U[:, :r] * S[:r]) @ Vh[:r]  # B, A, normalized -G_r


def grads():
    return autograd_mean_grad(TinyNet(), ["fc1", "fc2"], calibration_batches())


def build(form="lora", **kw):
    kw = {"rank": R, "alpha": ALPHA, "init": "lora_one", "lora_one_gamma": GAMMA, **kw}
    return adapted(form, calibration=calibration_batches(), **kw)


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_factors_match_reference_and_base_is_untouched(layer):
    G = grads()[layer]
    B_ref, A_ref, _ = reference(G, R)
    model, _ = build()
    lay = getattr(model, layer)
    f = lay.adapters["default"].form
    assert_columns_match(f.B.detach(), B_ref)  # each singular pair has its own sign
    assert_columns_match(f.A.detach().T, A_ref.T)
    W0 = getattr(TinyNet(), layer).weight.detach()
    torch.testing.assert_close(lay.linear_weight().detach(), W0, rtol=0, atol=0)  # no weight manipulation
    assert lay.adapters["default"].shift_A.shape[0] == 0


@pytest.mark.parametrize("scale", ["lora", "rslora"])
def test_update_at_init_is_one_normalized_rank_r_gradient_step(scale):
    """ΔW0 = s·B·A = -(s / (gamma·sigma_1))·G_r: aligned with -G's top-r singular subspace."""
    G_all = grads()
    model, _ = build(scale=scale)
    s = ALPHA / R if scale == "lora" else ALPHA / math.sqrt(R)
    for layer in ("fc1", "fc2"):
        f = getattr(model, layer).adapters["default"].form
        G = G_all[layer]
        _, _, step = reference(G, R)
        W0 = getattr(TinyNet(), layer).weight.detach()
        torch.testing.assert_close(f.delta_weight(W0), s / GAMMA * step, rtol=1e-6, atol=1e-12)
        # the column space of B is that of -G's top-r left singular vectors
        U = torch.linalg.svd(-G)[0][:, :R]
        Bq = torch.linalg.qr(f.B.detach())[0]
        torch.testing.assert_close(Bq @ Bq.T, U @ U.T, rtol=0, atol=1e-9)
        # and it is a descent direction: <ΔW, G> < 0
        assert (f.delta_weight(W0) * G).sum() < 0


def test_factors_are_balanced():
    model, _ = build()
    f = model.fc2.adapters["default"].form
    S = torch.linalg.svdvals(grads()["fc2"])
    D = torch.diag(S[:R] / S[0]) / GAMMA
    B, A = f.B.detach(), f.A.detach()
    torch.testing.assert_close(B.T @ B, D, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(A @ A.T, D, rtol=1e-6, atol=1e-12)


def one_step_model():
    """The reference end point: TinyNet with W0 - s/(gamma·sigma_1)·G_r on both targets, densely."""
    G_all, ref = grads(), TinyNet()
    with torch.no_grad():
        for layer in ("fc1", "fc2"):
            getattr(ref, layer).weight.add_(S_LORA / GAMMA * reference(G_all[layer], R)[2])
    return ref


def test_starts_at_the_one_step_model_not_at_the_base():
    x, _ = tiny_data()
    model, handle = build()
    assert not INITS.get("lora_one").obj.starts_as_base
    torch.testing.assert_close(model(x).logits, one_step_model()(x).logits, rtol=1e-6, atol=1e-12)
    assert (model(x).logits - TinyNet()(x).logits).abs().max() > 1e-4
    handle.delete()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)


def test_the_one_step_init_lowers_the_calibration_loss():
    x, y = tiny_data(64, seed=7)  # the calibration data
    model, _ = build(lora_one_gamma=1.0)
    assert model(x=x, labels=y).loss < TinyNet()(x=x, labels=y).loss


@pytest.mark.skipif("dora" not in FORMS.names(), reason="no dora form")
def test_with_dora_starts_at_the_same_one_step_model():
    """As the official code: DoRA's magnitude is the row norm of W0 + s·B·A."""
    x, _ = tiny_data()
    model, _ = build("dora")
    torch.testing.assert_close(model(x).logits, one_step_model()(x).logits, rtol=1e-6, atol=1e-12)
    f, W0 = model.fc2.adapters["default"].form, TinyNet().fc2.weight.detach()
    torch.testing.assert_close(f.m.detach(), (W0 + f.delta_weight(W0)).norm(dim=1), rtol=1e-6, atol=1e-12)


@pytest.mark.skipif("moslora" not in FORMS.names(), reason="no moslora form")
def test_with_moslora_starts_at_the_same_one_step_model():
    x, _ = tiny_data()
    model, _ = build("moslora")
    torch.testing.assert_close(model(x).logits, one_step_model()(x).logits, rtol=1e-6, atol=1e-12)


def test_randomized_svd_matches_exact():
    exact, _ = build()
    fast, _ = build(lora_one_niter=10)
    for layer in ("fc1", "fc2"):
        W0 = getattr(TinyNet(), layer).weight.detach()
        fe, ff = (getattr(m, layer).adapters["default"].form for m in (exact, fast))
        torch.testing.assert_close(ff.delta_weight(W0), fe.delta_weight(W0), rtol=1e-5, atol=1e-9)


class DeadBranch(nn.Module):
    """fc2 runs but its output is detached: its calibration gradient is exactly zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(12, 3).double(), nn.Linear(12, 4).double()

    def forward(self, x, labels):
        logits = self.fc1(x) + 0 * self.fc2(x).detach().sum()
        return types.SimpleNamespace(loss=F.cross_entropy(logits, labels))


def test_zero_gradient_layer_is_refused_before_any_change():
    model = DeadBranch()
    batches = [{"x": b["x"], "labels": b["labels"]} for b in calibration_batches()]
    with pytest.raises(lorazoo.SpecError, match="(?s)lora_one.*fc2.*zero"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(init="lora_one", rank=2, targets=["fc1", "fc2"]),
                      calibration=batches)
    assert not any(type(m).__name__ == "AdaptedLayer" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_needs_calibration():
    with pytest.raises(lorazoo.SpecError, match="calibration"):
        lorazoo.adapt(TinyNet(), lorazoo.AdapterSpec(init="lora_one", rank=2, targets=["fc1"]))


@pytest.mark.parametrize("form", [f for f in ("vera", "loha", "lokr") if f in FORMS.names()])
def test_forms_without_plain_factors_are_refused(form):
    with pytest.raises(lorazoo.SpecError, match=rf"(?s)'lora_one'.*'{form}'"):
        lorazoo.AdapterSpec(form=form, init="lora_one")


def test_bad_options_are_refused():
    with pytest.raises(lorazoo.SpecError, match="lora_one_gamma"):
        lorazoo.AdapterSpec(init="lora_one", lora_one_gamma=0)
    with pytest.raises(lorazoo.SpecError, match="lora_one_niter"):
        lorazoo.AdapterSpec(init="lora_one", lora_one_niter=-1)
    with pytest.raises(lorazoo.SpecError, match="lora_one_niter"):
        lorazoo.AdapterSpec(init="lora_one", lora_one_niter=2.5)


def test_preset_follows_the_study_and_the_paper():
    spec = lorazoo.AdapterSpec.preset("lora_one")
    assert spec.init == "lora_one" and spec.scale == "rslora" and spec.options["lora_one_gamma"] == 128
