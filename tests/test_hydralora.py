"""HydraLoRA (Tian et al. 2024 [91]; study Eq. 133): y = W0 x + s·(Σ_i ω_i(x) B_i) A x, ω = softmax(W_g x)."""
import math

import pytest
import torch

import lorazoo
from tiny import TinyNet, adapted, layer_input, perturb, tiny_data


def _form(layer):
    return layer.adapters["default"].form


def _reference(layer, x, k, r, scale):
    """Eq. 133 per token, one expert at a time, with the softmax written out."""
    f = _form(layer)
    A, B, Wg = f.A.detach(), f.B.detach(), f.router.detach()
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    out = x @ W0.T + b
    logits = x @ Wg.T
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    omega = e / e.sum(-1, keepdim=True)
    for i in range(k):
        B_i = B[:, i * r:(i + 1) * r]
        out = out + scale * omega[..., i:i + 1] * (x @ A.T @ B_i.T)
    return out


def test_matches_dense_reference_per_token():
    model, handle = adapted("hydralora", rank=3, alpha=6, experts=3)
    perturb(handle)
    x = layer_input(n=6).reshape(2, 3, 16)  # (batch, seq, in): routing is per token
    torch.testing.assert_close(model.fc2(x), _reference(model.fc2, x, 3, 3, 6 / 3), rtol=1e-6, atol=0)


def test_default_experts_and_parameter_count():
    model, handle = adapted("hydralora", rank=2)
    f = _form(model.fc1)  # 12 -> 16
    assert f.experts == 4
    assert handle.num_trainable() == sum(2 * i + 4 * 2 * o + 4 * i for i, o in ((12, 16), (16, 16)))


def test_zero_update_at_init():
    x, _ = tiny_data()
    model, handle = adapted("hydralora", rank=4, experts=3)
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        assert torch.count_nonzero(f.B) == 0 and f.A.abs().min() > 0 and f.router.abs().min() > 0
        bound = 1 / math.sqrt(layer.in_features)  # Kaiming-uniform with a = sqrt(5), as nn.Linear
        assert f.A.abs().max() <= bound and f.router.abs().max() <= bound
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


def test_gates_are_a_per_token_distribution():
    model, handle = adapted("hydralora", rank=2, experts=3)
    perturb(handle)
    w = _form(model.fc2).gates(layer_input())
    torch.testing.assert_close(w.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.all(w > 0) and not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("init", [True, False])
def test_gradient_reaches_every_expert_and_the_router(init):
    model, handle = adapted("hydralora", rank=2, experts=3)
    if not init:
        perturb(handle)
    x, y = tiny_data()
    model(x=x, labels=y).loss.backward()
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        for i in range(3):
            assert f.B.grad[:, i * 2:(i + 1) * 2].abs().sum() > 0, i
        # at init every B_i is zero, so the router and A get no gradient yet (as LoRA's A)
        assert (f.router.grad.abs().sum() > 0) == (not init)


def test_one_expert_is_lora():
    x, _ = tiny_data()
    lora_model, lora = adapted("lora", rank=3, alpha=5)
    perturb(lora)
    hydra_model, hydra = adapted("hydralora", rank=3, alpha=5, experts=1)
    perturb(hydra, seed=9)  # router differs: with one expert ω = 1 whatever it is
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            _form(getattr(hydra_model, name)).A.copy_(_form(getattr(lora_model, name)).A)
            _form(getattr(hydra_model, name)).B.copy_(_form(getattr(lora_model, name)).B)
    torch.testing.assert_close(hydra_model(x).logits, lora_model(x).logits, rtol=1e-6, atol=0)


def test_rank_dropout_mask_acts_on_the_shared_rank():
    model, handle = adapted("hydralora", rank=2, experts=2)
    perturb(handle)
    layer = model.fc2
    f = _form(layer)
    x = layer_input()
    mask = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = f(x, torch.zeros(5, 16, dtype=torch.float64), None, mask)
    with torch.no_grad():
        f.A.mul_(mask[:, None])  # M ⊙ (A x) == (M ⊙ A) x
    ref = _reference(layer, x, 2, 2, f.scale) - x @ layer.base.weight.detach().T - layer.base.bias.detach()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_not_mergeable():
    model, handle = adapted("hydralora", rank=2)
    with pytest.raises(lorazoo.NotMergeableError):
        handle.merge()


@pytest.mark.parametrize("experts", [0, 1.5, "3", 1000])
def test_bad_experts_refused(experts):
    with pytest.raises(lorazoo.SpecError, match="experts"):
        lorazoo.AdapterSpec(form="hydralora", experts=experts)
