"""MLoRE [96]: experts of different ranks, a sample-level noisy top-k router, cv² load balancing."""
import pytest
import torch

import lorazoo
from moe_reference import softmax_rows
from tiny import TinyNet, adapted, perturb, single_layer, tiny_data, trains_and_reloads


def _form(layer):
    return layer.adapters["default"].form


def _reference(layer, x, k):
    """Per sample: ω = softmax(W_g·mean_t x_t) with the E - k smallest zeroed (no renormalization);
    y_t = W0 x_t + b + s·Σ_i ω_i B_i A_i x_t, expert i the next r_i units."""
    f = _form(layer)
    A, B, Wg = f.A.detach(), f.B.detach(), f.gate.weight.detach()
    ranks = f.ranks
    out = x @ layer.base.weight.detach().T + layer.base.bias.detach()
    gates_all = []
    for b in range(x.shape[0]):
        g = softmax_rows((x[b].sum(0) / x.shape[1])[None] @ Wg.T)[0]
        keep = sorted(range(len(ranks)), key=lambda i: -float(g[i]))[:k]
        w = torch.stack([g[i] if i in keep else torch.zeros((), dtype=g.dtype) for i in range(len(ranks))])
        gates_all.append(w)
        start = 0
        for i, r in enumerate(ranks):
            out[b] = out[b] + f.scale * w[i] * (x[b] @ A[start:start + r].T @ B[:, start:start + r].T)
            start += r
    return out, torch.stack(gates_all)


@pytest.mark.parametrize("ranks,k", [([1, 2, 3, 4, 5, 6, 7, 8], 5), ([2, 3], 1), ([4, 1, 2], 3)])
def test_eval_matches_reference_per_sample(ranks, k):
    model, handle, layer = single_layer("molre", rank=4, alpha=8, molre_ranks=ranks, top_k=k)
    perturb(handle)
    f = _form(layer)
    assert f.A.shape == (sum(ranks), 20) and f.B.shape == (24, sum(ranks)) and f.gate.weight.shape == (len(ranks), 20)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    model.eval()
    ref, gates = _reference(layer, x, k)
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f.gate.last.gates, gates, rtol=1e-12, atol=0)
    assert torch.all((f.gate.last.gates != 0).sum(-1) == k)


def test_training_adds_noise_scaled_by_sigma_and_eval_has_none():
    model, handle, layer = single_layer("molre", molre_ranks=[1, 2, 3], top_k=2)
    perturb(handle)
    f = _form(layer)
    x = torch.randn(4, 6, 20, dtype=torch.float64)
    model.eval()
    clean = model(x)
    model.train()
    torch.manual_seed(0)
    noisy = model(x)
    assert not torch.allclose(noisy, clean)
    logits = (x.mean(1) @ f.gate.weight.detach().T)
    sigma = x.mean(1) @ f.gate.noise_weight.detach().T
    torch.manual_seed(0)
    ref = softmax_rows(logits + torch.randn_like(sigma) * sigma)
    torch.testing.assert_close(f.gate.last.probs, ref, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        f.gate.noise_weight.zero_()  # σ = 0: training routes as eval
    torch.testing.assert_close(model(x), clean, rtol=1e-12, atol=0)


def test_balancing_loss_is_cv_squared_of_mean_gates():
    model, handle, layer = single_layer("molre", molre_ranks=[1, 2, 3, 4], top_k=2, molre_aux_weight=0.5)
    perturb(handle)
    f = _form(layer)
    with torch.no_grad():
        f.gate.noise_weight.zero_()
    x = torch.randn(5, 4, 20, dtype=torch.float64)
    model.train()
    model(x)
    _, gates = _reference(layer, x, 2)
    m = gates.mean(0)
    ref = (m.std() / m.mean()) ** 2
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, 0.5 * ref, rtol=1e-8, atol=1e-12)
    loss.backward()
    assert f.gate.weight.grad.abs().sum() > 0


def test_starts_as_base_trains_and_save_load(tmp_path):
    x, _ = tiny_data()
    model, handle = adapted("molre", molre_ranks=[1, 2, 3, 4], top_k=2)
    model.eval()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    trains_and_reloads(model, handle, tmp_path)
    with pytest.raises(lorazoo.NotMergeableError):
        handle.merge()


def test_preset():
    spec = lorazoo.AdapterSpec.preset("molre")
    assert (spec.form, spec.options["molre_ranks"], spec.options["top_k"]) == ("molre", [1, 2, 3, 4, 5, 6, 7, 8], 5)


@pytest.mark.parametrize("kw,match", [
    ({"molre_ranks": []}, "molre_ranks"), ({"molre_ranks": [1, 0]}, "molre_ranks"), ({"molre_ranks": "1,2"}, "molre_ranks"),
    ({"molre_ranks": [1, 2], "top_k": 3}, "top_k .3. cannot exceed"), ({"molre_aux_weight": -1}, "molre_aux_weight"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="molre", **kw)


def test_expert_rank_above_the_layer_refused_before_the_model_changes():
    model = TinyNet()
    spec = lorazoo.AdapterSpec(form="molre", molre_ranks=[2, 13], top_k=1, targets=["fc1", "fc2"])
    with pytest.raises(lorazoo.SpecError, match="rank 13"):
        lorazoo.adapt(model, spec)
    assert isinstance(model.fc1, torch.nn.Linear)
