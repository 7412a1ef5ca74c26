"""EVA (study Eq. 55, 116-123, [64]) and the activation half of the calibration pass.

A = top eigenvectors of C = XᵀX as rows, B = 0; ranks: each layer offers round(rho·r) components,
ratios ξ_j = λ_j / Σλ, budget r·L, every layer keeps its first component, the rest go by largest ξ."""
import pytest
import torch

import lorazoo
from lorazoo.inits.calibration import collect
from lorazoo.registry import FORMS
from reference import assert_columns_match
from tiny import TinyNet, adapted, calibration_batches, tiny_data


def tiny_inputs():
    """The inputs of fc1 and fc2 over the whole calibration set, computed directly."""
    x = torch.cat([b["x"] for b in calibration_batches()])
    net = TinyNet()
    with torch.no_grad():
        return {"fc1": x, "fc2": torch.tanh(net.fc1(x))}


def eig_desc(X):
    vals, vecs = torch.linalg.eigh(X.T @ X)
    return vals.flip(0), vecs.flip(1)


def reference_ranks(inputs, r, rho, max_rank):
    """Eq. 55 ratios ranked globally; one component per layer is always granted (see eva.py)."""
    pool, ranks = [], {}
    for path, X in inputs.items():
        vals, _ = eig_desc(X)
        k = min(round(rho * r), max_rank[path])
        ratio = vals / vals.sum()
        ranks[path] = 1
        pool += [(ratio[j].item(), path) for j in range(1, k)]
    pool.sort(key=lambda t: -t[0])
    for _, path in pool[: r * len(inputs) - len(inputs)]:
        ranks[path] += 1
    return ranks


def test_covariance_matches_reference_and_padding_is_left_out():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 4).double()

        def forward(self, x, attention_mask):
            return self.fc(x)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) > 0.4
    net = Masked()
    stats = collect(net, {"fc": net.fc}, [{"x": x, "attention_mask": mask.long()}], ["cov"])
    rows = x[mask]
    torch.testing.assert_close(stats["fc"].cov, rows.T @ rows, rtol=1e-6, atol=1e-12)
    assert stats["fc"].rows == int(mask.sum()) < 21 and stats["fc"].grad is None


@pytest.mark.parametrize("rank, rho", [(3, 2.0), (2, 3.0), (4, 1.0)])
def test_directions_and_ranks_match_reference(rank, rho):
    inputs = tiny_inputs()
    ranks = reference_ranks(inputs, rank, rho, {"fc1": 12, "fc2": 16})
    model, handle = adapted(rank=rank, init="eva", eva_rho=rho, calibration=calibration_batches())
    assert handle.ranks == ranks
    assert sum(ranks.values()) == rank * 2
    assert handle.spec.part_classes()["init"].summary(handle) == {"ranks": ranks, "total": rank * 2, "capacity": rank * 2}
    for path, X in inputs.items():
        form = getattr(model, path).adapters["default"].form
        _, vecs = eig_desc(X)
        assert form.A.shape[0] == ranks[path]
        assert_columns_match(form.A.detach().T, vecs[:, : ranks[path]])
        assert torch.count_nonzero(form.B) == 0


def test_redistribution_moves_rank_and_rho_one_keeps_it():
    _, h = adapted(rank=3, init="eva", eva_rho=2, calibration=calibration_batches())
    assert h.ranks != {"fc1": 3, "fc2": 3}  # the tiny model's inputs are not equally spread
    _, h = adapted(rank=3, init="eva", eva_rho=1, calibration=calibration_batches())
    assert h.ranks == {"fc1": 3, "fc2": 3}


def test_every_layer_keeps_one_component():
    """Layer 0 sees isotropic inputs (ratios 1/8 each), layer 1 a rank-4 signal (ratios ~1/4 each):
    a pure global ranking of the budget 4 would give layer 0 nothing; here it keeps its top one."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.diag(torch.tensor([10.0] * 4 + [1e-3] * 4, dtype=torch.float64)))
        net[0].bias.zero_()
    x = torch.linalg.qr(torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    spec = lorazoo.AdapterSpec(init="eva", rank=2, eva_rho=2, targets=["0", "1"])
    handle = lorazoo.adapt(net, spec, calibration=[{"input": x}])
    assert handle.ranks == {"0": 1, "1": 3}
    assert handle.ranks == reference_ranks({"0": x, "1": net[0].base(x).detach()}, 2, 2.0, {"0": 8, "1": 8})


@pytest.mark.parametrize("form", [f for f in ("lora", "dora", "moslora") if f in FORMS.names()])
def test_starts_as_base(form):
    x, _ = tiny_data()
    model, _ = adapted(form, rank=3, init="eva", calibration=calibration_batches())
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


def test_refusals():
    with pytest.raises(lorazoo.SpecError, match="eva_rho"):
        lorazoo.AdapterSpec(init="eva", eva_rho=0.5)
    model = TinyNet()
    with pytest.raises(lorazoo.SpecError, match="no batch"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(init="eva", targets=["fc1"]), calibration=iter([]))
    assert not any(type(m).__name__ == "AdaptedLayer" for m in model.modules())
