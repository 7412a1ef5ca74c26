"""The findings judged on kept adapters (study/findings_weights.py): each verdict on synthetic weights
whose answer is known by construction, and the loader on a real saved run."""
import pytest
import torch
from test_findings import row, verdict
from tiny import TinyTask

import lorazoo
from lorazoo.study import findings as F
from lorazoo.study import findings_weights as FW

D = torch.float64
K = 48  # input and output width of the synthetic layers


def orth(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=D)).Q


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Rows whose kept adapters are synthetic weight dicts: ``add(variant, rank, lr, seed, metric, w)``."""
    fake, rows = {}, []
    monkeypatch.setattr(FW, "weights", lambda folder: fake[folder])

    def add(variant, rank, lr, seed, metric, w):
        folder = tmp_path / f"{len(fake)}-{variant}-{rank}-{lr}-{seed}"
        folder.mkdir()
        fake[str(folder)] = w
        r = row("sentiment", variant, lr, seed, metric, rank=rank)
        r["result"] = {"adapter_dir": str(folder)}
        rows.append(r)
    return add, rows


def lora_w(A, B, W=None):
    W = torch.eye(K, dtype=D) if W is None else W
    return {"delta": {"l": B @ A}, "W": {"l": W}, "A": {"l": A}}


def test_subspace_holds_when_the_r8_top_direction_is_in_the_r64_adapter(store):
    add, rows = store
    for s in range(3):
        V = orth(K, 40, s).T  # orthonormal rows
        A8 = torch.diag(torch.linspace(8, 1, 8, dtype=D)) @ V[:8]
        A64 = torch.cat([10 * V[:1], 0.1 * V[8:40]])  # its top direction is A8's top one
        add("lora", 8, 1e-3, s, 0.8, lora_w(A8, torch.ones(K, 8, dtype=D)))
        add("lora", 64, 1e-3, s, 0.8, lora_w(A64, torch.ones(K, 33, dtype=D)))
        add("lora", 8, 1e-4, s, 0.6, lora_w(A8, torch.ones(K, 8, dtype=D)))  # not the best rate: ignored
    v = verdict("lora_subspace", rows)
    assert v.verdict == F.HOLDS and "1.000" in v.ours and "lr 0.001" in v.ours


def test_subspace_fails_for_orthogonal_top_directions_and_one_seed_is_untestable(store):
    add, rows = store
    for s in range(3):
        V = orth(K, 16, s).T
        add("lora", 8, 1e-3, s, 0.8, lora_w(V[:8], torch.ones(K, 8, dtype=D)))
        add("lora", 64, 1e-3, s, 0.8, lora_w(V[8:16], torch.ones(K, 8, dtype=D)))
    assert verdict("lora_subspace", rows).verdict == F.FAILS
    assert verdict("lora_subspace", [r for r in rows if r["config"]["seed"] == 0]).verdict == F.UNTESTABLE


def test_amplification_holds_for_a_low_rank_update_off_w_top_directions(store, monkeypatch):
    add, rows = store
    monkeypatch.setattr(FW, "R_HIGH", K)  # the synthetic layers are K wide
    U, V = orth(K, K, 7), orth(K, K, 8)
    sig = torch.logspace(1, -2, K, dtype=D)  # strongly decaying spectrum
    W = U @ torch.diag(sig) @ V.T
    off = U[:, 30:38] @ V[:, 30:38].T  # rank 8 along W's weak directions: a large factor
    along = W * 0.01  # full width, along W itself: factor ‖ΔW‖ / ‖W‖ = 0.01
    for s in range(3):
        add("lora", 8, 1e-3, s, 0.8, {"delta": {"l": off * (3 + 0.1 * s)}, "W": {"l": W}, "A": None})
        add("lora", K, 1e-3, s, 0.8, {"delta": {"l": along * (1 + 0.1 * s)}, "W": {"l": W}, "A": None})
    v = verdict("lora_amplification", rows)
    assert v.verdict == F.HOLDS, v
    rows.clear()
    for s in range(3):  # the rank-8 update along W's own top directions: nothing hidden is amplified
        add("lora", 8, 1e-2, s, 0.8, {"delta": {"l": U[:, :8] @ torch.diag(sig[:8]) @ V[:, :8].T * (1 + 0.1 * s)},
                                      "W": {"l": W}, "A": None})
        add("lora", K, 1e-2, s, 0.8, {"delta": {"l": off * (3 + 0.1 * s)}, "W": {"l": W}, "A": None})
    assert verdict("lora_amplification", rows).verdict == F.FAILS


def test_amplification_closed_form_on_one_layer():
    U, V = orth(K, K, 1), orth(K, K, 2)
    sig = torch.logspace(1, -2, K, dtype=D)
    W = U @ torch.diag(sig) @ V.T
    delta = U[:, 40:42] @ V[:, 40:42].T * 5
    amp, rel = FW._amp_per_seed({"delta": {"l": delta}, "W": {"l": W}}, 2)
    proj = float(sig[40:42].norm())  # ‖Uᵀ W V‖ on ΔW's directions; W's own top-2: ‖σ_1, σ_2‖
    assert amp == pytest.approx(float(delta.norm()) / proj, rel=1e-9)
    assert rel == pytest.approx(proj / float(sig[:2].norm()), rel=1e-9)


def test_lorma_rank_low_for_lora_and_plus_full_for_pi(store):
    add, rows = store
    W0 = orth(K, K, 3) * 2
    for s in range(2):
        B, A = torch.randn(K, 8, dtype=D), torch.randn(8, K, dtype=D)
        add("lora", 8, 1e-3, s, 0.8, lora_w(A, B))
        add("lorma_plus", 8, 1e-3, s, 0.8, {"delta": {"l": B @ A @ W0}, "W": {"l": W0}, "A": None})
        add("lorma_pi", 8, 1e-3, s, 0.8, {"delta": {"l": torch.randn(K, K, dtype=D)}, "W": {"l": W0}, "A": None})
    v = verdict("lorma_rank", rows)
    assert v.verdict == F.HOLDS and "largest rank 8" in v.ours and f"largest rank {K}" in v.ours
    low_pi = [r for r in rows if r["config"]["variant"] != "lorma_pi"]
    add("lorma_pi", 8, 1e-3, 0, 0.8, {"delta": {"l": B @ A}, "W": {"l": W0}, "A": None})
    assert verdict("lorma_rank", low_pi + rows[-1:]).verdict == F.FAILS


def test_lorma_correlation_against_a_random_matrix(store):
    add, rows = store
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        d = torch.randn(K, 4, generator=g, dtype=D) @ torch.randn(4, K, generator=g, dtype=D)
        add("lora", 8, 1e-3, s, 0.8, {"delta": {"l": d}, "W": {"l": d}, "A": None})
        near = d + 0.3 * torch.randn(K, K, generator=g, dtype=D)
        add("lorma_plus", 8, 1e-3, s, 0.8, {"delta": {"l": near}, "W": {"l": d}, "A": None})
    v = verdict("lorma_correlation", rows)
    assert v.verdict == F.HOLDS, v
    lora = rows[0::2]
    for s in range(3):  # a LoRMA update unrelated to LoRA's: no more aligned than a random matrix
        g = torch.Generator().manual_seed(99 + s)
        add("lorma_pi", 8, 1e-3, s, 0.8, {"delta": {"l": torch.randn(K, K, generator=g, dtype=D)}, "W": {}, "A": None})
    assert verdict("lorma_correlation", lora + rows[-3:]).verdict == F.FAILS


def test_weight_findings_without_kept_adapters_or_with_them_gone(store):
    add, rows = store
    for key in ("lora_subspace", "lora_amplification", "lorma_rank", "lorma_correlation"):
        assert verdict(key, rows).verdict == F.NOT_RUN
    add("lorma_plus", 8, 1e-3, 0, 0.8, {})
    rows[-1]["result"]["adapter_dir"] = "/nonexistent/kept"
    add("lora", 8, 1e-3, 0, 0.8, {})
    rows[-1]["result"]["adapter_dir"] = "/nonexistent/kept2"
    v = verdict("lorma_rank", rows)
    assert v.verdict == F.UNTESTABLE and "not on this machine" in v.reason


def test_weights_loads_a_saved_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lorazoo.run import run
    from lorazoo.tasks.base import TASKS

    monkeypatch.setitem(TASKS, TinyTask.name, TinyTask)
    run("tiny_ckpt", lorazoo.AdapterSpec(form="lora", rank=4, alpha=8), lr=2e-2, epochs=1, batch_size=16,
        out_dir=str(tmp_path / "r4"), progress=False)
    FW.weights.cache_clear()
    w = FW.weights(str(tmp_path / "r4"))
    saved = load_file(str(tmp_path / "r4" / "adapter.safetensors"))
    for layer, A in w["A"].items():
        A_file = next(v for k, v in saved.items() if k.startswith(f"{layer}.") and k.endswith(".A")).to(D)
        B_file = next(v for k, v in saved.items() if k.startswith(f"{layer}.") and k.endswith(".B")).to(D)
        torch.testing.assert_close(A.to(D), A_file, rtol=0, atol=1e-6)
        torch.testing.assert_close(w["delta"][layer].to(D), 2.0 * B_file @ A_file, rtol=1e-5, atol=1e-6)  # s = 8/4
        assert w["delta"][layer].dtype == torch.float32  # the adapter's own: its rank tolerance is float32's
        assert w["W"][layer].shape == w["delta"][layer].shape
