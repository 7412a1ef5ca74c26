"""GoRA (study Eq. 51-53, 107-109, [62]): ranks from gradient importance under LoRA's parameter
budget, A ~ U(±1/sqrt(in)), B = -(gamma·sqrt(in)/alpha)·G·Aᵀ(AAᵀ)⁻¹; the base is not shifted."""
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo.registry import INITS
from test_lora_ga import autograd_mean_grad
from tiny import TinyNet, calibration_batches, tiny_data, train

R, ALPHA, GAMMA = 4, 8.0, 0.5


def build(model=None, targets=("fc1", "fc2"), calibration=None, **kw):
    model = model or TinyNet()
    kw = {"rank": R, "alpha": ALPHA, "init": "gora", "scale": "rslora", "gora_gamma": GAMMA, **kw}
    spec = lorazoo.AdapterSpec(targets=list(targets), **kw)
    return model, lorazoo.adapt(model, spec, calibration=calibration or calibration_batches())


def reference_ranks(model, names, batches, r_ref, kind="mean", feat=lambda f: f):
    """Eq. 51-53 by hand (no bound active): shares, P = Σ f·r_ref, r* = P·a/f, floor, then largest
    remainder while a rank fits in P."""
    G = autograd_mean_grad(model, names, batches)
    I = {}
    for n in names:
        prod = model.get_submodule(n).weight.detach() * G[n]
        I[n] = prod.abs().mean().item() if kind == "mean" else prod.norm().item()
    f = {n: feat(sum(model.get_submodule(n).weight.shape)) for n in names}
    P = sum(f[n] * r_ref for n in names)
    star = {n: P * I[n] / sum(I.values()) / f[n] for n in names}
    ranks = {n: math.floor(star[n]) for n in names}
    left = P - sum(f[n] * ranks[n] for n in names)
    for n in sorted(names, key=lambda n: -(star[n] - ranks[n])):
        if f[n] <= left + 1e-9:
            ranks[n] += 1
            left -= f[n]
    return ranks, star, P, f


class Chain(nn.Module):
    """Four 16 -> 16 layers (one shape), HF calling convention."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.inp = nn.Linear(12, 16)
        self.l0, self.l1, self.l2, self.l3 = (nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 + 0.3 * (i % 3)))
        self.double()

    def forward(self, x, labels=None):
        h = torch.tanh(self.inp(x))
        for layer in (self.l0, self.l1, self.l2, self.l3):
            h = torch.tanh(layer(h))
        logits = self.head(h)
        return types.SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


CHAIN = ["l0", "l1", "l2", "l3"]


@pytest.mark.parametrize("kind", ["mean", "frobenius"])
@pytest.mark.parametrize("features", ["linear", "sqrt"])
def test_ranks_match_hand_written_eq_51_53(kind, features):
    feat = (lambda f: f) if features == "linear" else math.sqrt
    ref, star, P, f = reference_ranks(Chain(), CHAIN, calibration_batches(), R, kind, feat)
    assert all(1 <= v <= 16 for v in star.values())  # no bound active: Eq. 53 as printed
    _, handle = build(Chain(), CHAIN, gora_importance=kind, gora_features=features)
    assert handle.ranks == ref
    assert len(set(ref.values())) > 1  # the allocation is not trivially uniform
    summary = handle.spec.part_classes()["init"].summary(handle)  # what `lorazoo train` prints
    assert summary == {"ranks": ref, "total": sum(ref.values()), "capacity": R * len(CHAIN)}


def test_unequal_shapes_tinynet_budget_never_exceeded_and_leftover_too_small():
    ref, _, P, f = reference_ranks(TinyNet(), ["fc1", "fc2"], calibration_batches(), R)
    model, handle = build()
    assert handle.ranks == ref
    used = sum(f[n] * handle.ranks[n] for n in f)
    assert used <= P and P - used < min(f.values())
    for n, r in handle.ranks.items():
        assert getattr(model, n).adapters["default"].form.A.shape[0] == r


@pytest.mark.parametrize("lo,hi", [(1, 0), (3, 5), (2, 4)])
def test_budget_is_exact_for_one_shape_and_bounds_hold(lo, hi):
    _, handle = build(Chain(), CHAIN, gora_min_rank=lo, gora_max_rank=hi)
    assert sum(handle.ranks.values()) == len(CHAIN) * R  # Σ r_i = L·r_ref exactly
    top = hi or 16
    assert all(lo <= r <= top for r in handle.ranks.values())


def test_clipped_allocation_keeps_order_of_importance():
    ref, star, _, _ = reference_ranks(Chain(), CHAIN, calibration_batches(), R)
    _, handle = build(Chain(), CHAIN, gora_min_rank=3, gora_max_rank=5)
    order = sorted(CHAIN, key=lambda n: star[n])
    got = [handle.ranks[n] for n in order]
    assert got == sorted(got)  # more important layers never get fewer ranks


def test_init_equations_float64():
    G_all = autograd_mean_grad(TinyNet(), ["fc1", "fc2"], calibration_batches())
    model, handle = build()
    for name in ("fc1", "fc2"):
        lay = getattr(model, name)
        f = lay.adapters["default"].form
        A, B = f.A.detach(), f.B.detach()
        r, n_in = A.shape
        G = G_all[name]
        assert A.dtype == torch.float64 and A.abs().max() <= 1 / math.sqrt(n_in)
        # Eq. 108 with A⁺ = Aᵀ(AAᵀ)⁻¹, written through a linear solve (not a pseudo-inverse)
        B_ref = -(GAMMA * math.sqrt(n_in) / ALPHA) * torch.linalg.solve(A @ A.T, A @ G.T).T
        torch.testing.assert_close(B, B_ref, rtol=1e-9, atol=1e-12)
        # Eq. 107: B·A is the best compression of c·(-G) onto A's row space: residual ⟂ rows of A
        c = GAMMA * math.sqrt(n_in) / ALPHA
        torch.testing.assert_close((B @ A + c * G) @ A.T, torch.zeros(G.shape[0], r, dtype=G.dtype),
                                   rtol=0, atol=1e-12)
        W0 = getattr(TinyNet(), name).weight.detach()
        s = ALPHA / math.sqrt(r)
        torch.testing.assert_close(f.delta_weight(W0), s * B_ref @ A, rtol=1e-9, atol=1e-12)
        assert (f.delta_weight(W0) * G).sum() < 0  # a descent direction
        torch.testing.assert_close(lay.linear_weight().detach(), W0, rtol=0, atol=0)  # base untouched


def test_output_matches_dense_reference_and_does_not_start_as_base():
    x, _ = tiny_data()
    model, handle = build()
    assert not INITS.get("gora").obj.starts_as_base
    ref = TinyNet()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            f = getattr(model, name).adapters["default"].form
            getattr(ref, name).weight.add_(ALPHA / math.sqrt(f.A.shape[0]) * f.B.detach() @ f.A.detach())
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-9, atol=1e-12)
    assert (model(x).logits - TinyNet()(x).logits).abs().max() > 1e-6
    handle.delete()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)


def test_init_step_lowers_the_calibration_loss():
    x, y = tiny_data(64, seed=7)
    model, _ = build()
    assert model(x=x, labels=y).loss < TinyNet()(x=x, labels=y).loss


def test_save_load_keeps_per_layer_ranks(tmp_path):
    x, _ = tiny_data()
    model, handle = build()
    train(model, handle, steps=3)
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    assert loaded.ranks == handle.ranks
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    ({"gora_min_rank": 0}, "gora_min_rank"),
    ({"gora_max_rank": -1}, "gora_max_rank"),
    ({"gora_min_rank": 3, "gora_max_rank": 2}, "gora_max_rank"),
    ({"gora_features": "log"}, "gora_features"),
    ({"gora_importance": "nuc"}, "gora_importance"),
    ({"gora_gamma": -1.0}, "gora_gamma"),
    ({"gora_max_rank": 3}, "reference rank 4"),
    ({"gora_min_rank": 5, "gora_max_rank": 8}, "reference rank 4"),
])
def test_bad_options_refused_before_model_changes(bad, match):
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError, match=match):
        build(model, **bad)
    assert isinstance(model.fc1, nn.Linear) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_needs_calibration():
    with pytest.raises(lorazoo.SpecError, match="calibration"):
        lorazoo.adapt(TinyNet(), lorazoo.AdapterSpec(rank=R, init="gora", targets=["fc1"]))


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(12, 4).double(), nn.Linear(12, 3).double()
        self.head.requires_grad_(False)

    def forward(self, x, labels):
        logits = self.head(x) + 0 * self.fc1(x).sum()  # depends on fc1, zero gradient
        return types.SimpleNamespace(loss=F.cross_entropy(logits, labels))


def test_all_zero_gradients_refused():
    with pytest.raises(lorazoo.SpecError, match="(?s)gora.*zero"):
        lorazoo.adapt(Dead(), lorazoo.AdapterSpec(rank=2, init="gora", targets=["fc1"]),
                      calibration=calibration_batches())
