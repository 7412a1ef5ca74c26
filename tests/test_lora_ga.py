"""LoRA-GA (study Eq. 99-102, [27]) and the gradient half of the calibration pass.

G = mean over calibration batches of dL/dW0 = U S Vᵀ; A = c·V[:, :r]ᵀ, B = c·U[:, r:2r],
c = d_out^(1/4)/sqrt(gamma); base W0 - s·B·A."""
import types
from collections import UserDict

import pytest
import torch
import torch.nn.functional as F

import lorazoo
from lorazoo.inits.calibration import collect
from lorazoo.registry import FORMS
from reference import assert_columns_match
from tiny import TinyNet, adapted, calibration_batches, tiny_data

R, ALPHA, GAMMA = 3, 6.0, 4.0
S_LORA = ALPHA / R


def autograd_mean_grad(model, names, batches):
    """Reference: dL/dW by autograd on a copy whose target weights require grad, averaged."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
    total = [torch.zeros_like(w) for w in weights]
    for b in batches:
        for t, g in zip(total, torch.autograd.grad(model(**b).loss, weights)):
            t += g
    return {n: t / len(batches) for n, t in zip(names, total)}


def test_hooked_gradient_equals_autograd_and_model_is_restored():
    model = TinyNet()
    model.train()
    model.head.weight.requires_grad_(False)  # a mixed state, restored exactly
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = collect(model, {"fc1": model.fc1, "fc2": model.fc2}, calibration_batches(), ["grad"])
    ref = autograd_mean_grad(TinyNet(), ["fc1", "fc2"], calibration_batches())
    for n in ("fc1", "fc2"):
        torch.testing.assert_close(stats[n].grad, ref[n], rtol=1e-6, atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_gradient_through_a_layer_that_already_has_an_adapter():
    """The wrapper, not its base module, is hooked (an adapted layer runs W x without calling it)."""
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets=["fc1", "fc2"]), name="first")  # B = 0
    targets = {p: getattr(model, p).base for p in ("fc1", "fc2")}
    stats = collect(model, targets, calibration_batches(), ["grad"])
    ref = autograd_mean_grad(TinyNet(), ["fc1", "fc2"], calibration_batches())
    for n in ("fc1", "fc2"):
        torch.testing.assert_close(stats[n].grad, ref[n], rtol=1e-6, atol=1e-12)


class ConvNet(torch.nn.Module):
    """GPT-2 style Conv1D layers (weights stored (in, out)) with the HF calling convention."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = Conv1D(10, 12), Conv1D(3, 10)
        self.double()

    def forward(self, x, labels):
        logits = self.c2(torch.tanh(self.c1(x)))
        return types.SimpleNamespace(loss=F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1)))


def test_conv1d_gradient_is_in_out_in_layout_over_sequences():
    g = torch.Generator().manual_seed(2)
    batches = [UserDict(x=torch.randn(2, 5, 12, generator=g, dtype=torch.float64),  # like HF BatchEncoding
                        labels=torch.randint(0, 3, (2, 5), generator=g)) for _ in range(3)]
    net = ConvNet()
    stats = collect(net, {"c1": net.c1, "c2": net.c2}, batches, ["grad"])
    ref = autograd_mean_grad(ConvNet(), ["c1", "c2"], [dict(b) for b in batches])
    for n in ("c1", "c2"):
        torch.testing.assert_close(stats[n].grad, ref[n].T, rtol=1e-6, atol=1e-12)  # (out, in)


def reference_factors(G, r):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    c = G.shape[0] ** 0.25 / GAMMA ** 0.5  # Eq. 102, d_out = rows of the (out, in) gradient
    return c * U[:, r:2 * r], c * Vh[:r], c


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_factors_and_shifted_base_match_reference(layer):
    G = autograd_mean_grad(TinyNet(), [layer], calibration_batches())[layer]
    B_ref, A_ref, _ = reference_factors(G, R)
    model, _ = adapted(rank=R, alpha=ALPHA, init="lora_ga", lora_ga_gamma=GAMMA, calibration=calibration_batches())
    lay = getattr(model, layer)
    form = lay.adapters["default"].form
    assert_columns_match(form.B.detach(), B_ref)  # each singular vector has its own sign
    assert_columns_match(form.A.detach().T, A_ref.T)
    W0 = getattr(TinyNet(), layer).weight.detach()
    torch.testing.assert_close(lay.linear_weight().detach(), W0 - S_LORA * form.B.detach() @ form.A.detach(),
                               rtol=1e-6, atol=1e-12)


def test_first_step_projection_is_best_rank_2r_gradient():
    """Eq. 99: P = B Bᵀ G + G Aᵀ A is c²·G_2r, the optimal rank-2r approximation of G."""
    G = autograd_mean_grad(TinyNet(), ["fc2"], calibration_batches())["fc2"]
    _, _, c = reference_factors(G, R)
    model, _ = adapted(rank=R, alpha=ALPHA, init="lora_ga", lora_ga_gamma=GAMMA, calibration=calibration_batches())
    form = model.fc2.adapters["default"].form
    B, A = form.B.detach(), form.A.detach()
    U, S, Vh = torch.linalg.svd(G)
    torch.testing.assert_close(B @ B.T @ G + G @ A.T @ A, c ** 2 * (U[:, :2 * R] * S[:2 * R] @ Vh[:2 * R]),
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("form", [f for f in ("lora", "dora", "moslora") if f in FORMS.names()])
def test_starts_as_base(form):
    x, _ = tiny_data()
    model, _ = adapted(form, rank=R, alpha=ALPHA, init="lora_ga", calibration=calibration_batches())
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


def assert_untouched(model):
    assert not any(type(m).__name__ == "AdaptedLayer" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    torch.testing.assert_close(model.fc1.weight, TinyNet().fc1.weight, rtol=0, atol=0)


@pytest.mark.parametrize("calibration, match", [
    ([], "no batch"),
    ([{"x": tiny_data()[0]}], "loss"),  # no labels: the model returns loss=None
    ([(tiny_data()[0],)], "dicts"),
])
def test_bad_calibration_is_refused_before_any_change(calibration, match):
    model = TinyNet()
    spec = lorazoo.AdapterSpec(init="lora_ga", rank=2, targets=["fc1", "fc2"])
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.adapt(model, spec, calibration=calibration)
    assert_untouched(model)
    with pytest.raises(lorazoo.SpecError, match="calibration"):
        lorazoo.adapt(model, spec)


def test_rank_above_half_the_layer_is_refused():
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError, match="rank <= 6"):  # fc1 has 12 inputs: 2r <= 12
        lorazoo.adapt(model, lorazoo.AdapterSpec(init="lora_ga", rank=7, targets=["fc1"]),
                      calibration=calibration_batches())
    assert_untouched(model)


def test_bad_options_are_refused():
    with pytest.raises(lorazoo.SpecError, match="lora_ga_gamma"):
        lorazoo.AdapterSpec(init="lora_ga", lora_ga_gamma=0)
    with pytest.raises(lorazoo.SpecError, match="lora_ga_niter"):
        lorazoo.AdapterSpec(init="lora_ga", lora_ga_niter=-2)
