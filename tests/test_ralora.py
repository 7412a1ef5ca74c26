"""RaLoRA(-Pro) (study Eq. 54 and 14-15, [63]): n = 2^clip(floor(log2(erank(G)/r)), 0, P) blocks of
MeLoRA's block diagonal per layer, erank(G) = exp(-Σ p log p) with p = σ/Σσ; Pro allocates r_i by
GoRA's Eq. 51-53 first. LoRA-r's parameter count, rank up to n·r, starts at the base."""
import math

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.inits.ralora import effective_rank
from test_gora import CHAIN, Chain, reference_ranks
from test_lora_ga import autograd_mean_grad
from tiny import TinyNet, calibration_batches, perturb, tiny_data, train

ALPHA = 4.0


def build(model=None, targets=("fc1", "fc2"), rank=1, **kw):
    model = model or TinyNet()
    spec = lorazoo.AdapterSpec(form="ralora", init="ralora", rank=rank, alpha=ALPHA, targets=list(targets), **kw)
    return model, lorazoo.adapt(model, spec, calibration=calibration_batches())


def ref_erank(G):
    s = torch.linalg.svdvals(G)
    p = s / s.sum()
    return math.exp(-sum(float(v * math.log(v)) for v in p.tolist() if v > 0))


def ref_blocks(G, r, max_power=5):
    power = min(max_power, max(0, math.floor(math.log2(ref_erank(G) / r))))
    n = 2 ** power
    out_f, in_f = G.shape
    while n > 1 and r > min(in_f // n, out_f // n):
        n //= 2
    return n


def blockdiag_reference(form):
    """s·diag(B_i A_i) with blocks cut as torch.tensor_split, by a loop over blocks."""
    n, (out_f, r), in_f = form.blocks, form.B.shape, form.A.shape[1]
    dW = torch.zeros(out_f, in_f, dtype=form.A.dtype)
    rows = torch.tensor_split(torch.arange(out_f), n)
    cols = torch.tensor_split(torch.arange(in_f), n)
    for o, i in zip(rows, cols):
        dW[o[0]:o[-1] + 1, i[0]:i[-1] + 1] = form.B[o].detach() @ form.A[:, i].detach()
    return form.scale * dW


def test_effective_rank_of_k_equal_singular_values_is_k():
    Q1, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    for k in (1, 3, 7):
        S = torch.zeros(20, 12, dtype=torch.float64)
        S[range(k), range(k)] = 2.5
        assert effective_rank(Q1 @ S @ Q2) == pytest.approx(k, rel=1e-9)
    G = torch.randn(16, 12, dtype=torch.float64)
    assert effective_rank(G) == pytest.approx(ref_erank(G), rel=1e-9)
    assert effective_rank(torch.zeros(4, 3, dtype=torch.float64)) == 1.0


@pytest.mark.parametrize("rank,max_power", [(1, 5), (2, 5), (1, 1), (3, 5)])
def test_block_counts_follow_erank_of_the_calibration_gradient(rank, max_power):
    G = autograd_mean_grad(TinyNet(), ["fc1", "fc2"], calibration_batches())
    model, handle = build(rank=rank, ralora_max_power=max_power)
    for name in ("fc1", "fc2"):
        form = getattr(model, name).adapters["default"].form
        assert form.blocks == ref_blocks(G[name], rank, max_power)
        assert form.block_rank == rank and form.rank == form.blocks * rank
    assert handle.ranks == {"fc1": rank, "fc2": rank}  # plain RaLoRA keeps r on every layer
    if (rank, max_power) == (1, 5):
        assert {getattr(model, n).adapters["default"].form.blocks for n in ("fc1", "fc2")} == {4}


def test_output_and_delta_match_dense_block_diagonal_reference():
    x, _ = tiny_data()
    model, handle = build()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=0, atol=0)  # B = 0: the base
    perturb(handle)
    ref = TinyNet()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            form = getattr(model, name).adapters["default"].form
            dW = blockdiag_reference(form)
            torch.testing.assert_close(form.delta_weight(None), dW, rtol=1e-12, atol=1e-12)
            getattr(ref, name).weight.add_(dW)
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-10, atol=1e-12)


def test_lora_parameter_count_and_rank_n_times_r():
    model, handle = build(rank=1)
    perturb(handle)
    for name in ("fc1", "fc2"):
        form = getattr(model, name).adapters["default"].form
        assert form.A.numel() + form.B.numel() == 1 * (form.in_features + form.out_features)
        assert form.blocks > 1
        assert torch.linalg.matrix_rank(form.delta_weight(None)) == form.blocks * form.block_rank


def test_blocks_per_block_init_bounds():
    model, _ = build(rank=1)
    form = model.fc1.adapters["default"].form
    for A_i in form.A.split(form.in_sizes, dim=1):
        assert A_i.abs().max() <= 1 / math.sqrt(A_i.shape[1])  # Kaiming-uniform with the block's fan-in
    assert not form.B.any()


def test_pro_allocates_gora_ranks_then_blocks():
    ref, _, _, _ = reference_ranks(Chain(), CHAIN, calibration_batches(), 4)
    model, handle = build(Chain(), CHAIN, rank=4, ralora_pro=True)
    assert handle.ranks == ref and sum(ref.values()) == 4 * len(CHAIN) and len(set(ref.values())) > 1
    G = autograd_mean_grad(Chain(), CHAIN, calibration_batches())
    for name in CHAIN:
        form = getattr(model, name).adapters["default"].form
        assert form.block_rank == ref[name] and form.blocks == ref_blocks(G[name], ref[name])
    assert {getattr(model, n).adapters["default"].form.blocks for n in CHAIN} == {1, 2}  # blocks differ per layer


def test_save_load_restores_block_counts(tmp_path):
    x, _ = tiny_data()
    model, handle = build()
    train(model, handle, steps=3)
    handle.save(tmp_path)
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    for name in ("fc1", "fc2"):
        a, b = (getattr(m, name).adapters["default"].form for m in (model, fresh))
        assert b.blocks == a.blocks > 1
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


def test_form_without_the_init_is_one_block():
    model = TinyNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec(form="ralora", rank=2, targets=["fc1"]))
    assert model.fc1.adapters["default"].form.blocks == 1


@pytest.mark.parametrize("kw,match", [
    ({"form": "lora"}, "form='ralora'"),
    ({"ralora_pro": "yes"}, "ralora_pro"),
    ({"ralora_max_power": -1}, "ralora_max_power"),
    ({"ralora_max_power": 1.5}, "ralora_max_power"),
    ({"ralora_min_rank": 0}, "ralora_min_rank"),
    ({"ralora_features": "log"}, "ralora_features"),
])
def test_bad_options_refused_before_model_changes(kw, match):
    model = TinyNet()
    spec_kw = {"form": "ralora", "init": "ralora", "rank": 1, "targets": ["fc1", "fc2"], **kw}
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.adapt(model, lorazoo.AdapterSpec(**spec_kw), calibration=calibration_batches())
    assert isinstance(model.fc1, nn.Linear)
