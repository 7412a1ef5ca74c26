"""lorazoo.analysis and `lorazoo analyze`: each analysis on cases with a known answer, written
independently of the implementation (float64), and the command on tiny saved runs."""
import json
import math

import pytest
import torch
from tiny import TinyNet, TinyTask, adapted, calibration_batches, perturb

import lorazoo
from lorazoo.analysis import (amplification, auc_reduction, correlation, delta_weights, effective_rank,
                              gradient_effective_ranks, lora_factors, loss_auc, numerical_rank, principal_angles,
                              spectrum, stable_rank, subspace_similarity, subspace_similarity_grid)
from lorazoo.cli import main
from lorazoo.errors import LorazooError

D = torch.float64


def orthonormal(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=D)).Q


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- subspace similarity (LoRA Eq. 4) -------------------------------------------------------------
def test_phi_of_a_subspace_with_itself_is_one_everywhere():
    A = rand(6, 20)
    grid = subspace_similarity_grid(A, A)
    assert grid.shape == (6, 6)
    torch.testing.assert_close(grid, torch.ones(6, 6, dtype=D), rtol=0, atol=1e-12)
    for i in range(1, 7):
        assert subspace_similarity(A, A, i, i) == pytest.approx(1.0, abs=1e-12)


def test_phi_of_orthogonal_row_spaces_is_zero():
    Q = orthonormal(20, 8, seed=1).T  # 8 orthonormal rows
    A1, A2 = rand(3, 3, seed=2) @ Q[:3], rand(5, 5, seed=3) @ Q[3:]
    torch.testing.assert_close(subspace_similarity_grid(A1, A2), torch.zeros(3, 5, dtype=D), rtol=0, atol=1e-12)


def test_phi_closed_form_with_known_singular_directions():
    # A1's right-singular vectors e1 (σ=3), e2 (σ=1); A2's: cosθ e1 + sinθ e3 (σ=2), e4 (σ=0.5)
    th = 0.3
    e = torch.eye(6, dtype=D)
    A1 = torch.stack([3 * e[0], 1 * e[1]])
    A2 = torch.stack([2 * (math.cos(th) * e[0] + math.sin(th) * e[2]), 0.5 * e[3]])
    c2 = math.cos(th) ** 2
    expected = torch.tensor([[c2, c2 / 1], [c2 / 1, c2 / 2]], dtype=D)  # ‖U1^iᵀ U2^j‖² / min(i, j)
    torch.testing.assert_close(subspace_similarity_grid(A1, A2), expected, rtol=0, atol=1e-12)
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(c2, abs=1e-12)
    assert subspace_similarity(A2, A1, 2, 1) == pytest.approx(c2, abs=1e-12)


def test_phi_depends_on_the_row_space_only_at_full_rank():
    A1, A2 = rand(4, 15, seed=4), rand(6, 15, seed=5)
    R = rand(4, 4, seed=6) + 3 * torch.eye(4, dtype=D)  # invertible: a change of basis A -> R A
    assert subspace_similarity(R @ A1, A2, 4, 6) == pytest.approx(subspace_similarity(A1, A2, 4, 6), abs=1e-12)
    assert subspace_similarity(A1, R @ A1, 4, 4) == pytest.approx(1.0, abs=1e-12)
    # reference straight from Eq. 4 with the right-singular vectors of each A
    V1, V2 = torch.linalg.svd(A1).Vh, torch.linalg.svd(A2).Vh
    for i, j in [(1, 1), (2, 5), (4, 3)]:
        ref = float((V1[:i] @ V2[:j].T).pow(2).sum()) / min(i, j)
        assert subspace_similarity(A1, A2, i, j) == pytest.approx(ref, abs=1e-12)
        assert float(subspace_similarity_grid(A1, A2)[i - 1, j - 1]) == pytest.approx(ref, abs=1e-12)


def test_phi_refuses_bad_indices_and_shapes():
    A1, A2 = rand(4, 15), rand(6, 15)
    with pytest.raises(LorazooError, match="i = 5 exceeds"):
        subspace_similarity(A1, A2, 5, 1)
    with pytest.raises(LorazooError, match="j must be an integer >= 1"):
        subspace_similarity(A1, A2, 1, 0)
    with pytest.raises(LorazooError, match="different input sizes"):
        subspace_similarity_grid(A1, rand(4, 14))
    with pytest.raises(LorazooError, match="2-D tensor"):
        subspace_similarity_grid(rand(4), A1)


# --- amplification (LoRA Table 7) -----------------------------------------------------------------
def test_amplification_of_a_scaled_singular_direction_of_w_is_the_closed_form():
    U, V = orthonormal(10, 5, seed=7), orthonormal(8, 5, seed=8)
    sig = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=D)
    W = U @ torch.diag(sig) @ V.T
    c = 0.7
    out = amplification(W, c * torch.outer(U[:, 2], V[:, 2]))  # ΔW = c·u3 v3ᵀ: rank 1
    assert out["r"] == 1
    assert out["proj_delta"] == pytest.approx(3.0, abs=1e-10)           # u3ᵀ W v3 = σ3
    assert out["amplification"] == pytest.approx(c / 3.0, abs=1e-10)
    assert out["proj_weight"] == pytest.approx(5.0, abs=1e-10)          # W's own top direction
    assert out["norm_weight"] == pytest.approx(math.sqrt(55.0), abs=1e-10)
    assert out["norm_delta"] == pytest.approx(c, abs=1e-12)
    assert 0 <= out["proj_random"] <= out["proj_weight"] + 1e-12        # Ky Fan: W's top-r directions are the max

    two = amplification(W, 2.0 * torch.outer(U[:, 2], V[:, 2]) + 1.0 * torch.outer(U[:, 4], V[:, 4]))
    assert two["r"] == 2
    assert two["proj_delta"] == pytest.approx(math.sqrt(9.0 + 1.0), abs=1e-10)
    assert two["proj_weight"] == pytest.approx(math.sqrt(25.0 + 16.0), abs=1e-10)
    assert two["amplification"] == pytest.approx(math.sqrt(5.0) / math.sqrt(10.0), abs=1e-10)
    assert amplification(W, c * torch.outer(U[:, 2], V[:, 2]), r=3)["proj_weight"] == pytest.approx(
        math.sqrt(50.0), abs=1e-10)


def test_amplification_refuses_zero_updates_and_bad_ranks():
    W = rand(6, 5)
    with pytest.raises(LorazooError, match="ΔW is zero"):
        amplification(W, torch.zeros(6, 5, dtype=D))
    with pytest.raises(LorazooError, match=r"r must be an integer in \[1, 5\]"):
        amplification(W, rand(6, 5, seed=1), r=6)
    with pytest.raises(LorazooError, match="same shape"):
        amplification(W, rand(5, 6))


# --- rank and spectrum ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_of_a_product_of_rank_r_factors_is_r(dtype):
    for r in (1, 3, 7):
        M = (rand(30, r, seed=r) @ rand(r, 20, seed=r + 10)).to(dtype)
        assert numerical_rank(M) == r
        assert spectrum(M)["rank"] == r
    assert numerical_rank(torch.zeros(4, 3, dtype=dtype)) == 0


def test_effective_rank_of_k_equal_singular_values_is_k():
    for k in (1, 2, 5):
        S = torch.zeros(9, 7, dtype=D)
        S[range(k), range(k)] = 2.5
        M = orthonormal(9, 9, seed=k) @ S @ orthonormal(7, 7, seed=k + 1).T
        assert effective_rank(M) == pytest.approx(k, rel=1e-10)
        assert stable_rank(M) == pytest.approx(k, rel=1e-10)
    # unequal: exp of the entropy of σ/Σσ, by hand
    M = torch.diag(torch.tensor([3.0, 1.0], dtype=D))
    p = [0.75, 0.25]
    assert effective_rank(M) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-12)
    assert stable_rank(M) == pytest.approx(10.0 / 9.0, rel=1e-12)
    assert effective_rank(torch.zeros(3, 3, dtype=D)) == 0.0
    s = spectrum(M)
    assert s["singular_values"] == pytest.approx([3.0, 1.0]) and s["frobenius_norm"] == pytest.approx(math.sqrt(10))


def test_ralora_uses_the_analysis_effective_rank_floored_at_one():
    from lorazoo.inits import ralora

    G = rand(8, 6, seed=3)
    assert ralora.effective_rank(G) == effective_rank(G)
    assert ralora.effective_rank(torch.zeros(3, 3, dtype=D)) == 1.0


# --- correlation of two updates (LoRMA Table 9) ---------------------------------------------------
def test_correlation_of_identical_updates():
    D1 = rand(12, 3, seed=1) @ rand(3, 10, seed=2)
    out = correlation(D1, D1.clone())
    assert out["r"] == 3 and out["ranks"] == [3, 3]
    assert out["frobenius_distance"] == 0.0
    assert out["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert out["singular_value_ssd"] == pytest.approx(0.0, abs=1e-20)
    assert out["eigenvalue_ssd"] is None  # not square
    assert out["principal_angles"] == pytest.approx([0.0] * 3, abs=1e-7)
    neg = correlation(D1, -2 * D1)  # same column space, opposite direction
    assert neg["cosine"] == pytest.approx(-1.0, abs=1e-12) and neg["max_angle"] == pytest.approx(0.0, abs=1e-7)
    assert neg["frobenius_distance"] == pytest.approx(3 * float(torch.linalg.matrix_norm(D1)), rel=1e-12)


def test_correlation_closed_forms():
    e = torch.eye(5, dtype=D)
    for th in (1e-6, 0.4, math.pi / 2):  # column spaces span{e1} and span{cosθ e1 + sinθ e2}: angle θ
        u = math.cos(th) * e[0] + math.sin(th) * e[1]
        out = correlation(torch.outer(e[0], e[2]), torch.outer(u, e[3]))
        assert out["max_angle"] == pytest.approx(th, abs=1e-12)
        assert out["cosine"] == pytest.approx(0.0, abs=1e-15)  # flattened: disjoint entries
    a, b = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=D)), torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=D))
    out = correlation(a, b, r=2)
    assert out["singular_value_ssd"] == pytest.approx(1.0)   # (3-3)² + (2-1)²
    assert out["eigenvalue_ssd"] == pytest.approx(1.0)
    assert out["frobenius_distance"] == pytest.approx(math.sqrt(2.0))
    assert out["cosine"] == pytest.approx(11.0 / (math.sqrt(14.0) * math.sqrt(10.0)))
    # a rank-2 space inside a rank-3 one: every angle 0; principal_angles gives min(k1, k2) of them
    assert principal_angles(e[:, :3], e[:, :2]).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert principal_angles(e[:, :2], e[:, 2:4]).tolist() == pytest.approx([math.pi / 2] * 2, abs=1e-12)
    with pytest.raises(LorazooError, match="same shape"):
        correlation(a, rand(3, 4))


# --- loss AUC -------------------------------------------------------------------------------------
def test_loss_auc_is_the_normalized_trapezoid_area():
    from lorazoo.study import report

    assert report.loss_auc is loss_auc  # one definition, used by the study report too
    assert loss_auc([0.7] * 9) == pytest.approx(0.7)
    assert loss_auc([1.0, 0.0]) == 0.5
    assert loss_auc([2.0, 1.0, 0.0, 1.0]) == pytest.approx((1.5 + 0.5 + 0.5) / 3)
    assert loss_auc([3.0]) == 3.0 and math.isnan(loss_auc([]))
    assert auc_reduction(0.5, 1.0) == pytest.approx(50.0) and math.isnan(auc_reduction(1.0, 0.0))


# --- tensors of an adapter on a model --------------------------------------------------------------
@pytest.mark.parametrize("form, init", [("lora", "default"), ("lora", "pissa"), ("dora", "default"),
                                        ("lorma_plus", "default")])
def test_delta_weights_are_the_merged_weight_minus_the_pretrained_one(form, init):
    model, handle = adapted(form, rank=3, init=init)
    perturb(handle)
    before = {n: getattr(TinyNet(), n).weight.detach().clone() for n in ("fc1", "fc2")}  # pristine
    deltas = delta_weights(handle)
    if form != "lorma_plus":
        for n, (B, A) in lora_factors(handle).items():
            assert A.shape == (3, before[n].shape[1]) and B.shape == (before[n].shape[0], 3)
    handle.merge()
    for n in ("fc1", "fc2"):
        torch.testing.assert_close(deltas[n], getattr(model, n).base.weight.detach() - before[n], rtol=1e-10,
                                   atol=1e-12)
    if (form, init) == ("lora", "default"):  # LoRA: s·B·A from the factors
        handle.unmerge()
        s = handle.spec.alpha / handle.spec.rank
        B, A = lora_factors(handle)["fc1"]
        torch.testing.assert_close(delta_weights(handle, include_shift=False)["fc1"], s * B @ A, rtol=1e-12, atol=0)


def test_lora_factors_refuse_forms_without_factors():
    _, handle = adapted("loha", rank=2)
    with pytest.raises(LorazooError, match="has no B·A factors"):
        lora_factors(handle)


def test_gradient_effective_rank_at_the_base_model_matches_autograd():
    batches = calibration_batches()
    ref_model = TinyNet()
    grads = {n: torch.zeros_like(getattr(ref_model, n).weight) for n in ("fc1", "fc2")}
    for b in batches:
        ref_model.zero_grad()
        ref_model(**b).loss.backward()
        for n in grads:
            grads[n] += getattr(ref_model, n).weight.grad / len(batches)

    def erank(G):
        s = torch.linalg.svdvals(G)
        p = s / s.sum()
        return math.exp(-float((p * p.log()).sum()))

    model, handle = adapted("lora", rank=3)
    perturb(handle)  # a trained adapter; at="base" disables it
    got = gradient_effective_ranks(model, handle, batches, at="base")
    for n in grads:
        assert got[n] == pytest.approx(erank(grads[n]), rel=1e-9)
    adapted_ranks = gradient_effective_ranks(model, handle, batches, at="adapted")
    assert adapted_ranks["fc1"] != pytest.approx(got["fc1"], rel=1e-6)


# --- the command ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lorazoo.run import run
    from lorazoo.tasks.base import TASKS

    root = tmp_path_factory.mktemp("runs")
    had = TASKS.get(TinyTask.name)
    TASKS[TinyTask.name] = TinyTask
    try:
        for r in (8, 4):
            run("tiny_ckpt", lorazoo.AdapterSpec(form="lora", rank=r, alpha=2 * r), lr=2e-2, epochs=1, batch_size=16,
                out_dir=str(root / f"r{r}"), progress=False)
        yield root
    finally:
        if had is None:
            TASKS.pop(TinyTask.name, None)


@pytest.fixture
def tiny_task(monkeypatch):
    from lorazoo.tasks.base import TASKS

    monkeypatch.setitem(TASKS, TinyTask.name, TinyTask)


def _file_A(folder, layer):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter.safetensors"))
    return next(v for k, v in tensors.items() if k.startswith(f"{layer}.") and k.endswith(".A")).to(D)


def test_analyze_subspace_writes_the_heatmaps_and_the_numbers(runs, tiny_task, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "subspace", str(runs / "r8"), str(runs / "r4"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "φ(1,1)" in text and "fc1" in text and "fc2" in text
    data = json.loads((out / "subspace.json").read_text())
    assert data["analysis"] == "subspace" and data["of"] == "A"
    for layer in ("fc1", "fc2"):
        grid = torch.tensor(data["layers"][layer]["grid"], dtype=D)
        assert grid.shape == (8, 4)
        V1 = torch.linalg.svd(_file_A(runs / "r8", layer)).Vh  # right-singular vectors, straight from the file
        V2 = torch.linalg.svd(_file_A(runs / "r4", layer)).Vh
        for i, j in [(1, 1), (3, 2), (8, 4)]:
            ref = float((V1[:i] @ V2[:j].T).pow(2).sum()) / min(i, j)
            assert float(grid[i - 1, j - 1]) == pytest.approx(ref, abs=1e-5)
        assert (out / f"subspace_{layer}.png").stat().st_size > 1000
    assert main(["analyze", "subspace", str(runs / "r8"), "--random", "--json", "--modules", "fc2"]) == 0
    rnd = json.loads(capsys.readouterr().out)
    assert list(rnd["layers"]) == ["fc2"] and rnd["runs"][1] == "random"
    assert main(["analyze", "subspace", str(runs / "r8"), str(runs / "r4"), "--of", "delta", "--json"]) == 0
    delta = json.loads(capsys.readouterr().out)["layers"]["fc1"]
    assert (len(delta["grid"]), len(delta["grid"][0])) == (8, 4)  # ΔW's right-singular vectors up to its rank
    # ΔW = s·B·A has A's row space (B has full column rank): at full rank φ is the same for A and ΔW
    assert delta["phi_full"] == pytest.approx(data["layers"]["fc1"]["phi_full"], abs=1e-4)


def test_analyze_spectrum_amplification_correlation_auc_grad_rank(runs, tiny_task, tmp_path, capsys):
    out = tmp_path / "out"
    r8, r4 = str(runs / "r8"), str(runs / "r4")
    assert main(["analyze", "spectrum", r8, "--json", "--out", str(out)]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert {v["rank"] for v in spec["layers"].values()} == {8}
    assert (out / "spectrum.json").is_file() and (out / "spectrum.png").is_file()

    assert main(["analyze", "amplification", r4, "--json"]) == 0
    amp = json.loads(capsys.readouterr().out)["layers"]["fc1"]
    assert amp["r"] == 4 and amp["amplification"] == pytest.approx(amp["norm_delta"] / amp["proj_delta"])

    assert main(["analyze", "correlation", r8, r8, "--json"]) == 0
    same = json.loads(capsys.readouterr().out)["layers"]["fc2"]
    assert same["frobenius_distance"] == 0.0 and same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert main(["analyze", "correlation", r8, r4]) == 0
    assert "Θ_1" in capsys.readouterr().out

    assert main(["analyze", "auc", r8, r4, "--json", "--out", str(out)]) == 0
    auc = json.loads(capsys.readouterr().out)
    losses = json.loads((runs / "r8" / "result.json").read_text())["losses"]
    ref = sum((a + b) / 2 for a, b in zip(losses, losses[1:])) / (len(losses) - 1)
    assert auc["runs"][r8]["auc"] == pytest.approx(ref) and auc["runs"][r8]["auc_decrease_pct"] == 0.0
    assert (out / "auc.png").is_file()

    assert main(["analyze", "grad-rank", r8, "--json", "--batches", "2"]) == 0
    gr = json.loads(capsys.readouterr().out)
    assert gr["at"] == "base" and gr["batches"] == 2
    assert all(1.0 <= v["effective_rank"] <= v["max_rank"] for v in gr["layers"].values())


@pytest.mark.parametrize("argv, message", [
    (["spectrum", "/nonexistent/run"], "is not a folder"),
    (["subspace", "{r8}"], "subspace compares two runs"),
    (["subspace", "{r8}", "{r4}", "--random"], "--random compares one run"),
    (["spectrum", "{r8}", "--modules", "nosuchlayer"], "no adapted layer matches"),
    (["spectrum", "{r8}", "--modules", "("], "not a valid regular expression"),
    (["amplification", "{r8}", "--rank", "99"], "layer fc1: r must be an integer in [1, 12]"),
    (["auc", "{root}"], "holds neither metrics.json nor result.json"),
    (["grad-rank", "{r8}", "--batches", "0"], "--batches must be >= 1"),
])
def test_analyze_bad_input_exits_2_with_a_clear_message(argv, message, runs, tiny_task, capsys):
    argv = [a.format(r8=runs / "r8", r4=runs / "r4", root=runs) for a in argv]
    assert main(["analyze", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorazoo: error: ") and message in err, err
