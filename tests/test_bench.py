"""lorazoo bench on a tiny config: output files, and ratios taken to LoRA and to the floor."""
from __future__ import annotations

import json

import pytest
import torch

from lorazoo.cli import main
from lorazoo.errors import SpecError
from lorazoo.study.bench import add_ratios, parse_spec, plan, summary
from lorazoo.study.bench_peft import peft_equivalent
from lorazoo.study.bench_report import markdown
from lorazoo.study.bench_runner import BenchConfig

TINY = ["--hidden", "64", "--intermediate", "96", "--layers", "1", "--heads", "4", "--vocab", "128",
        "--batch", "2", "--seq", "16", "--rounds", "2", "--warmup", "1", "--mem-steps", "1",
        "--threads", "1", "--mem-jobs", "3"]


def _bench(tmp_path, *extra) -> dict:
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--out", str(out), *extra]) == 0
    assert (out / "bench.md").read_text().startswith("# lorazoo bench")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((out / "bench.json").read_text())


def _check_ratios(result: dict, memory: bool) -> dict:
    rows = {r["key"]: r for r in result["rows"]}
    lora, floor = rows["lorazoo:lora"], rows["floor"]
    for r in rows.values():
        assert r["step_s"] > 0 and r["fwd_s"] > 0
        assert r["step_vs_lora"] == pytest.approx(r["step_s"] / lora["step_s"])
        assert r["step_vs_floor"] == pytest.approx(r["step_s"] / floor["step_s"])
        if memory:
            assert r["overhead_mb"] > 0
            assert r["mem_vs_lora"] == pytest.approx(r["overhead_mb"] / lora["overhead_mb"])
            assert r["mem_vs_floor"] == pytest.approx(r["overhead_mb"] / floor["overhead_mb"])
            assert r["saved_vs_lora"] == pytest.approx(r["saved_mb"] / lora["saved_mb"])
        else:
            assert r["mem_vs_lora"] is None
        assert r["fwd_vs_base"] == pytest.approx(r["fwd_s"] / floor["fwd_s"])
        assert len(r["step_samples"]) == 2  # rounds, warm-up dropped
    assert lora["step_vs_lora"] == 1 and floor["step_vs_floor"] == 1 and floor["trainable"] == 0
    assert lora["mergeable"] and lora["merged_fwd_vs_base"] > 0
    return rows


def test_bench_lorazoo_only(tmp_path):
    result = _bench(tmp_path, "--variants", "rslora,lora:rank=4", "--no-memory")
    rows = _check_ratios(result, memory=False)
    assert set(rows) == {"floor", "lorazoo:lora", "lorazoo:rslora", "lorazoo:lora:rank=4"}
    assert rows["lorazoo:lora:rank=4"]["trainable_vs_lora"] == pytest.approx(0.5)
    assert rows["lorazoo:rslora"]["spec"]["scale"] == "rslora"


def test_bench_against_peft_with_memory(tmp_path):
    pytest.importorskip("peft")
    result = _bench(tmp_path, "--variants", "lora", "--against", "peft")  # 3 memory subprocesses
    rows = _check_ratios(result, memory=True)
    assert set(rows) == {"floor", "lorazoo:lora", "peft:lora"}
    assert rows["peft:lora"]["trainable"] == rows["lorazoo:lora"]["trainable"]
    assert rows["peft:lora"]["step_vs_own_lora"] == 1
    assert "## lorazoo vs PEFT" in (tmp_path / "bench" / "bench.md").read_text()


def test_plan_against_peft():
    pytest.importorskip("peft")
    cfg = BenchConfig(rank=4)
    methods, skipped = plan(cfg, ["rslora", "droplora", "lora:init=default"], against=["peft"])
    keys = [m.key for m in methods]
    assert keys[:2] == ["floor", "lorazoo:lora"]  # the references come first
    assert {"peft:lora", "peft:rslora", "peft:lora:init=default"} <= set(keys)
    assert "PEFT's lora has no rank dropout" in skipped["peft:droplora"]
    config, _ = peft_equivalent(parse_spec("rslora", cfg), cfg)
    assert config.use_rslora and config.r == 4 and config.lora_alpha == 16
    config, _ = peft_equivalent(parse_spec("hira:scale=constant:alpha=1", cfg), cfg)  # PEFT's HiRA: no scale
    assert type(config).__name__ == "HiraConfig" and config.r == 4
    config, reason = peft_equivalent(parse_spec("hira", cfg), cfg)
    assert config is None and "scale=constant:alpha=1" in reason


def test_paper_ranks_add_each_presets_own_rank():
    methods, _ = plan(BenchConfig(rank=8), ["vera", "dora", "lora:rank=16"], paper_ranks=True)
    labels = [m.label for m in methods if m.impl == "lorazoo"]
    assert labels == ["lora", "vera", "vera:rank=256", "dora", "lora:rank=16"]
    assert [m.spec["rank"] for m in methods if m.impl == "lorazoo"] == [8, 8, 256, 8, 16]


def test_parse_spec():
    cfg = BenchConfig(rank=4, alpha=8, targets=["q_proj"])
    spec = parse_spec("lora:scale=rslora:dropout=0.1", cfg)
    assert (spec.scale, spec.dropout, spec.rank, spec.alpha, spec.targets) == ("rslora", 0.1, 4, 8, ["q_proj"])
    assert parse_spec("scale=rslora", cfg).scale == "rslora"
    assert parse_spec("droplora:rank=2", cfg).rank_dropout == 0.5
    with pytest.raises(SpecError, match="key=value"):
        parse_spec("lora:rslora", cfg)
    with pytest.raises(SpecError, match="unknown variant"):
        parse_spec("nosuchvariant", cfg)


def test_config_errors():
    with pytest.raises(SpecError, match="multiple of heads"):
        BenchConfig(hidden=65, heads=4)
    with pytest.raises(SpecError, match="rounds"):
        BenchConfig(rounds=0)
    with pytest.raises(SpecError, match="torch device"):
        BenchConfig(device="abacus")
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="no CUDA device"):
            BenchConfig(device="cuda")


def test_ratios_and_report_without_memory():
    rows = [{"key": "floor", "variant": "floor", "impl": "floor", "trainable": 0, "step_s": 1.0, "fwd_s": 0.5},
            {"key": "lorazoo:lora", "variant": "lora", "impl": "lorazoo", "trainable": 10, "step_s": 2.0,
             "fwd_s": 0.6, "fwd_merged_s": 0.5},
            {"key": "peft:lora", "variant": "lora", "impl": "peft", "trainable": 10, "step_s": 4.0,
             "fwd_s": 0.7}]
    add_ratios(rows)
    assert rows[2]["step_vs_lora"] == 2.0 and rows[2]["step_vs_own_lora"] == 1.0
    assert rows[1]["step_vs_floor"] == 2.0 and rows[1]["merged_fwd_vs_base"] == 1.0
    assert rows[1]["mem_vs_lora"] is None  # no memory measured: no ratio, no crash
    result = {"config": BenchConfig().__dict__, "rows": rows, "skipped": {"x": "why"},
              "environment": {"cpus": 2, "torch": "t", "transformers": "t", "peft": "p",
                              "loadavg_before": (0.1,), "loadavg_after": (0.2,)}}
    text = markdown(result)
    assert "| lora | peft |" in text and "- `x`: why" in text


def test_summary():
    assert summary([3.0, 1.0, 2.0]) == (2.0, pytest.approx(0.5))
    assert summary(None) == (None, None)


def test_saved_for_backward_counts_activations_not_parameters():
    import torch
    from torch import nn

    from lorazoo.memory import MB, saved_for_backward_mb

    lin = nn.Linear(16, 32).double()  # its backward keeps the input x and its own weight
    x = torch.randn(10, 16, dtype=torch.float64)
    assert saved_for_backward_mb(lin, lambda: lin(x).sum().backward()) * MB == 10 * 16 * 8


def test_compile_flag_plans_compiled_rows_and_reports_them():
    """--compile reaches the config and the plan: one compiled row per lorazoo method (none for the
    floor), each compared with its eager row and with the compiled LoRA, and reported."""
    from lorazoo.cli import build_parser

    args = build_parser().parse_args(["bench", "--compile", "--compile-backend", "aot_eager"])
    assert args.compile and args.compile_backend == "aot_eager"
    assert not build_parser().parse_args(["bench"]).compile
    methods, _ = plan(BenchConfig(), ["dora"], compile=True)
    assert [m.key for m in methods] == ["floor", "lorazoo:lora", "lorazoo:dora", "lorazoo+compile:lora",
                                        "lorazoo+compile:dora"]
    assert methods[2].spec == methods[4].spec
    rows = [{"key": "floor", "variant": "floor", "impl": "floor", "trainable": 0, "step_s": 1.0, "fwd_s": 0.5},
            {"key": "lorazoo:lora", "variant": "lora", "impl": "lorazoo", "trainable": 10, "step_s": 2.0,
             "fwd_s": 0.6},
            {"key": "lorazoo:dora", "variant": "dora", "impl": "lorazoo", "trainable": 12, "step_s": 3.0,
             "fwd_s": 0.8},
            {"key": "lorazoo+compile:lora", "variant": "lora", "impl": "lorazoo+compile", "trainable": 10,
             "step_s": 1.5, "fwd_s": 0.3, "compile_s": 9.0, "backend": "inductor", "graph_breaks": 0},
            {"key": "lorazoo+compile:dora", "variant": "dora", "impl": "lorazoo+compile", "trainable": 12,
             "step_s": 1.8, "fwd_s": 0.4, "compile_s": 11.0, "backend": "inductor", "graph_breaks": 2}]
    add_ratios(rows)
    assert rows[3]["step_vs_eager"] == 0.75 and rows[4]["step_vs_eager"] == pytest.approx(0.6)
    assert rows[4]["fwd_vs_eager"] == 0.5 and rows[4]["step_vs_own_lora"] == pytest.approx(1.2)
    assert rows[4]["step_vs_lora"] == pytest.approx(0.9) and "step_vs_eager" not in rows[2]
    result = {"config": BenchConfig().__dict__, "rows": rows, "skipped": {},
              "environment": {"cpus": 2, "torch": "t", "transformers": "t", "peft": None,
                              "loadavg_before": (0.1,), "loadavg_after": (0.2,)}}
    text = markdown(result)
    assert "## torch.compile vs eager" in text and "| dora | 3000.0 | 1800.0 | 0.60 | 0.50 | 11.0 | 2 |" in text


def test_compiled_runner_steps_like_eager():
    """The compiled runner is a torch.compile module, and its first step moves the adapter as eager does."""
    import torch

    from lorazoo.study.bench_build import build_runner
    from lorazoo.study.bench_runner import Method, make_batch

    cfg = BenchConfig(hidden=32, intermediate=48, layers=1, heads=2, vocab=64, batch=2, seq=8,
                      compile_backend="aot_eager")
    spec = parse_spec("lora", cfg).to_dict()
    batch = make_batch(cfg)
    eager = build_runner(Method("lora", "lorazoo", spec), cfg, batch)
    compiled = build_runner(Method("lora", "lorazoo+compile", spec), cfg, batch)  # took one step to compile
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    note = compiled.notes[0]
    assert note["backend"] == "aot_eager" and note["compile_s"] > 0 and note["graph_breaks"] >= 0
    eager.step()

    def adapter(r):
        return {k: v for k, v in r.model.state_dict().items() if "lora" in k.lower() or "adapters" in k}
    a, b = adapter(eager), adapter(compiled)
    assert a and len(a) == len(b)
    for (ka, va), (kb, vb) in zip(sorted(a.items()), sorted(b.items())):
        torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-6)
    with pytest.raises(SpecError, match="unknown implementation"):
        build_runner(Method("lora", "nope", spec), cfg, batch)


def test_bench_mixed_sweeps_tokens_per_sample(tmp_path):
    """`bench --mixed K --mixed-seqs`: one row group per length, each way timed; against PEFT when installed
    (the run itself checks that both compute the same outputs)."""
    out = tmp_path / "mixed"
    assert main(["bench", *TINY, "--batch", "4", "--mixed", "2", "--mixed-seqs", "3,5", "--out", str(out)]) == 0
    runs = json.loads((out / "mixed.json").read_text())
    assert [r["config"]["seq"] for r in runs] == [3, 5]
    ways = {"base", "lorazoo mixed_batch", "lorazoo one adapter"}
    for r in runs:
        rows = {row["way"]: row for row in r["rows"]}
        assert ways <= set(rows) and all(row["forward ms"] > 0 for row in rows.values())
        if "peft adapter_names" in rows:
            assert rows["peft adapter_names"]["throughput ×PEFT"] == 1
    assert (out / "mixed.md").read_text().count("| lorazoo mixed_batch |") == 2


def test_a_method_the_bench_model_refuses_is_skipped_with_its_reason():
    """BitFit on the bench's Llama (no biases) is listed as skipped before anything is timed."""
    methods, skipped = plan(BenchConfig(), ["bitfit", "full_ft"])
    assert [m.key for m in methods] == ["floor", "lorazoo:lora", "lorazoo:full_ft"]
    assert "no biases" in skipped["lorazoo:bitfit"]
