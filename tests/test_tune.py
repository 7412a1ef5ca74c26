"""lorazoo.tune: the range test's analysis on synthetic curves, priors, snapping, refusals, the CLI,
and (slow) the issue's claim: on the sentiment task the proposal for LoRA, DoRA and LoRA+ lands
within one grid step of the full sweep's best rate in docs/study/trials.csv, with priors that
leave the variant out and with no priors at all."""
from __future__ import annotations

import csv
import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch

from lorazoo import tune
from lorazoo.errors import LorazooError
from lorazoo.spec import AdapterSpec

ROOT = Path(__file__).resolve().parents[1]
TRIALS_CSV = ROOT / "docs" / "study" / "trials.csv"
GRID = tune.STUDY_GRID


def synthetic_curve(edge=2e-2, floor_at=1e-2, steps=100, lr_min=1e-6, lr_max=1e-1, noise=0.0, seed=0):
    """A range-test-like curve: flat at ln 2 while the rate is small, falling as log(lr) nears
    ``floor_at``, then blowing up past ``edge``."""
    g = torch.Generator().manual_seed(seed)
    lrs = [lr_min * (lr_max / lr_min) ** (i / (steps - 1)) for i in range(steps)]
    losses = []
    for lr in lrs:
        x = math.log10(lr)
        fall = 0.2 / (1 + math.exp(-4 * (x - math.log10(floor_at) + 0.5)))
        blow = 0.0 if lr < edge else 3.0 * (math.log10(lr) - math.log10(edge)) + 0.3
        losses.append(math.log(2) - fall + blow + noise * float(torch.randn((), generator=g)))
    return lrs, losses


# --- the range test's analysis -------------------------------------------------------------------
def test_smooth_is_bias_corrected():
    assert tune.smooth([0.5] * 7, 0.9) == pytest.approx([0.5] * 7, rel=1e-12, abs=0)
    ys = [1.0, 0.0]
    assert tune.smooth(ys, 0.5) == pytest.approx([1.0, (0.25) / 0.75], rel=1e-12)


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_divergence_is_found_at_the_known_edge(noise):
    edge = 2e-2
    lrs, losses = synthetic_curve(edge=edge, noise=noise)
    a = tune.analyze_curve(lrs, losses, beta=0.9, diverge=0.1)
    # the smoothed loss crosses 1.1 x its minimum within a few steps (a fifth of a decade) of the edge
    assert edge <= a["lr_div"] <= edge * 10 ** 0.25
    assert 3e-3 <= a["lr_min_loss"] <= edge
    est = tune.estimate_from_curve(a)
    assert not est["lower_bound"]
    assert est["log10"] == pytest.approx(math.log10(a["lr_div"] / tune.DIVERGENCE_FACTOR), abs=1e-12)


def test_a_curve_that_never_rises_gives_a_lower_bound():
    lrs = [1e-5 * 10 ** (i / 10) for i in range(30)]
    losses = [0.7 - 0.001 * i for i in range(30)]
    a = tune.analyze_curve(lrs, losses)
    assert a["lr_div"] is None
    est = tune.estimate_from_curve({**a, "lrs": lrs}, lr_max=1e-2)
    assert est["lower_bound"] and est["sd"] == 2 * tune.SD_RANGE
    assert est["log10"] == pytest.approx(math.log10(1e-2 / tune.DIVERGENCE_FACTOR))


def test_a_non_finite_stop_diverges_at_the_next_rate():
    lrs = [1e-4, 1e-3, 1e-2]
    a = tune.analyze_curve(lrs, [0.7, 0.69, 0.68], stopped_non_finite=True)
    assert a["lr_div"] == pytest.approx(1e-1)
    with pytest.raises(LorazooError, match="first step"):
        tune.analyze_curve([], [], stopped_non_finite=True)
    with pytest.raises(LorazooError, match="as many rates"):
        tune.analyze_curve([1e-3, 1e-2], [0.7])


def test_early_noise_before_min_steps_is_not_divergence():
    lrs = [1e-5 * 10 ** (i / 20) for i in range(40)]
    losses = [0.4, 0.9] + [0.7] * 38   # a spike in the first steps, then flat
    assert tune.analyze_curve(lrs, losses, min_steps=5)["lr_div"] is None


def test_the_calibration_is_what_the_constants_say():
    """DIVERGENCE_FACTOR and SD_RANGE are the geometric mean and spread of lr_div / best over the
    calibration variants; their bests are the checked-in sweep's; the rule puts every calibration
    and held-out variant within one grid step of its sweep's best."""
    best = tune.best_rates(tune.load_priors(TRIALS_CSV))
    logs = [math.log10(div / b) for div, b in tune.CALIBRATION.values()]
    assert 10 ** (sum(logs) / len(logs)) == pytest.approx(tune.DIVERGENCE_FACTOR, rel=0.02)
    assert tune.SD_RANGE >= float(torch.tensor(logs).std()) > 0.15
    assert not set(tune.CALIBRATION) & set(tune.CALIBRATION_HELD_OUT)
    for variant, (div, b) in {**tune.CALIBRATION, **tune.CALIBRATION_HELD_OUT}.items():
        assert best[("sentiment", variant)]["lr"] == pytest.approx(b)
        assert tune.grid_steps(tune.snap(div / tune.DIVERGENCE_FACTOR), b) <= 1, variant


# --- snapping and combining ----------------------------------------------------------------------
def test_snap_is_nearest_in_log_space():
    assert tune.snap(2e-3) == 3e-3            # log distance 0.18 to 3e-3, 0.30 to 1e-3
    assert tune.snap(1.6e-3) == 1e-3          # 0.20 to 1e-3, 0.27 to 3e-3
    assert tune.snap(1e-9) == 1e-5 and tune.snap(5.0) == 1e-2
    assert tune.snap(math.sqrt(1e-3 * 3e-3)) == 1e-3   # a tie goes to the smaller rate
    assert tune.snap(4e-5, grid=[1e-5, 1e-4]) == 1e-4
    assert tune.grid_steps(1e-3, 3e-4) == 1 and tune.grid_steps(1e-5, 1e-2) == 5 and tune.grid_steps(2e-3, 3e-3) == 0


@pytest.mark.parametrize("bad", [[], [0.0, 1e-3], [-1e-3], ["x"], None, [float("nan")]])
def test_bad_grids_are_refused(bad):
    with pytest.raises(LorazooError, match="grid"):
        tune.snap(1e-3, grid=bad)


def test_snap_refuses_a_non_positive_rate():
    with pytest.raises(LorazooError):
        tune.snap(0.0)


def test_combine_weights_by_precision_and_never_passes_the_divergence():
    est = {"log10": -4.0, "sd": 0.5}
    prior = {"log10": -3.0, "sd": 0.5}
    c = tune.combine(est, prior)
    assert c["log10"] == pytest.approx(-3.5) and c["weight_prior"] == pytest.approx(0.5)
    c = tune.combine(est, {"log10": -3.0, "sd": 1.0})   # a prior twice as wide weighs a quarter as much
    assert c["weight_prior"] == pytest.approx(0.2) and c["log10"] == pytest.approx(-3.8)
    assert tune.combine(est, None) == {"log10": -4.0, "lr": pytest.approx(1e-4), "weight_prior": 0.0, "capped": False}
    capped = tune.combine({"log10": -2.0, "sd": 0.35}, {"log10": -2.0, "sd": 0.25}, lr_div=3e-3)
    assert capped["capped"] and capped["lr"] == pytest.approx(3e-3 / tune.SAFETY)


# --- priors ---------------------------------------------------------------------------------------
def rec(task, variant, lr, metric, auc=None):
    return {"task": task, "variant": variant, "lr": lr, "metric": metric, "loss_auc": auc}


def sweep(task, variant, best, metrics=(0.5, 0.8, 0.5)):
    """Three rates around ``best`` (one decade apart), the middle one best."""
    return [rec(task, variant, best * f, m) for f, m in zip((0.1, 1.0, 10.0), metrics)]


def test_best_rates_ties_go_to_the_lower_loss_auc_and_flat_sweeps_carry_nothing():
    rows = [rec("t", "a", 1e-4, 0.70, 0.60), rec("t", "a", 1e-3, 0.702, 0.65), rec("t", "a", 1e-2, 0.5, 0.9),
            rec("t", "a", 1e-5, 0.4, 0.7),
            *sweep("t", "flat", 1e-3, (0.56, 0.57, 0.56))]
    best = tune.best_rates(rows)
    assert best[("t", "a")]["lr"] == 1e-4 and best[("t", "a")]["learned"]
    assert not best[("t", "flat")]["learned"]
    assert not tune.best_rates(sweep("t", "b", 1e-3)[:2])[("t", "b")]["learned"]   # two rates: too few


def test_prior_kinds_in_order():
    rows = [*sweep("A", "lora", 1e-3), *sweep("A", "x", 1e-2), *sweep("B", "lora", 1e-4),
            *sweep("B", "y", 1e-3), *sweep("C", "x", 1e-1)]
    same = tune.prior_for(rows, "A", "x")
    assert same["kind"] == "same" and same["lr"] == pytest.approx(1e-2) and same["sd"] == tune.SD_SAME
    ratio = tune.prior_for(rows, "B", "x")   # x is 10x LoRA on A; LoRA's best on B is 1e-4
    assert ratio["kind"] == "ratio" and ratio["lr"] == pytest.approx(1e-3)
    task = tune.prior_for(rows, "B", "x", exclude_variants=["x"])   # LoRA 1e-4 and y 1e-3 on B
    assert task["kind"] == "task" and task["log10"] == pytest.approx(-3.5) and task["sd"] == tune.SD_TASK
    variant = tune.prior_for(rows, None, "x")   # own data: x's rates elsewhere (1e-2, 1e-1)
    assert variant["kind"] == "variant" and variant["log10"] == pytest.approx(-1.5)
    assert variant["sd"] == tune.SD_VARIANT
    assert tune.prior_for(rows, None, "z") is None
    assert tune.prior_for(rows, "B", "x", exclude_variants=["x", "y", "lora"]) is None


def test_trials_csv_priors_match_the_study_readme():
    recs = tune.load_priors(TRIALS_CSV)
    assert len(recs) == sum(1 for r in csv.DictReader(open(TRIALS_CSV)) if r["status"] == "done")
    best = tune.best_rates(recs)
    assert best[("sentiment", "lora")]["lr"] == 1e-3 and best[("sentiment", "dora")]["lr"] == 1e-3
    assert best[("sentiment", "loraplus")]["lr"] == pytest.approx(3e-4)
    assert best[("sentiment", "loha")]["lr"] == 1e-2 and best[("sentiment", "lora_ga")]["lr"] == 1e-4
    for flat in ("lorma", "lorma_pi", "vera", "adalora"):   # never above the majority class
        assert not best[("sentiment", flat)]["learned"]


def test_shipped_priors_are_the_checked_in_study():
    """lorazoo/tune_priors.py is generated from docs/study/trials.csv: regenerate it when that changes."""
    shipped = tune.load_priors("default")
    from_csv = tune.load_priors(TRIALS_CSV)
    text = tune.priors_module_text(from_csv, "docs/study/trials.csv")
    assert (ROOT / "src" / "lorazoo" / "tune_priors.py").read_text() == text
    def key(best):
        return {k: (v["lr"], v["learned"], round(v["metric"], 4)) for k, v in best.items()}

    assert key(tune.best_rates(shipped)) == key(tune.best_rates(from_csv))


def test_sqlite_priors(tmp_path):
    from lorazoo.study.store import Store

    db = tmp_path / "s.sqlite"
    configs = [{"task": "t", "variant": "v", "lr": lr, "seed": 0} for lr in (1e-4, 1e-3, 1e-2)]
    with Store(db) as store:
        store.save_study("s", {"grid": {}})
        store.add_trials("s", configs)
        for row, m in zip(store.trials("s"), (0.6, 0.8, 0.55)):
            store.finish("s", row["id"], {"status": "done", "result": {"metric": m, "metric_name": "accuracy",
                                                                     "losses": [0.7, 0.5, 0.4]}})
    recs = tune.load_priors(db)
    assert sorted(r["lr"] for r in recs) == [1e-4, 1e-3, 1e-2]
    assert all(r["loss_auc"] == pytest.approx((0.6 + 0.45) / 2) for r in recs)
    assert tune.prior_for(recs, "t", "v")["lr"] == pytest.approx(1e-3)


def test_bad_prior_sources_are_refused(tmp_path):
    with pytest.raises(LorazooError, match="no such file"):
        tune.load_priors(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(LorazooError, match="columns"):
        tune.load_priors(bad)
    neg = tmp_path / "neg.csv"
    neg.write_text("task,variant,lr,metric\nt,v,-1,0.5\n")
    with pytest.raises(LorazooError, match="lr must be > 0"):
        tune.load_priors(neg)
    db = tmp_path / "other.sqlite"
    sqlite3.connect(db).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(LorazooError, match="study file"):
        tune.load_priors(db)
    assert tune.load_priors(None) == []


# --- the whole proposal on a tiny task ------------------------------------------------------------
@pytest.fixture
def tiny_task():
    from lorazoo.tasks.base import TASKS
    from tiny import TinyTask

    TASKS.setdefault(TinyTask.name, TinyTask)
    return TinyTask.name


def test_propose_on_a_tiny_task(tiny_task):
    spec = AdapterSpec.preset("lora", targets=["fc1", "fc2"])
    r = tune.propose_lr(tiny_task, spec, priors=None, steps=40, lr_min=1e-5, lr_max=10.0, batch_size=32)
    rt = r["range_test"]
    assert len(rt["lrs"]) == len(rt["losses"]) == len(rt["smoothed"]) == rt["steps_run"] <= 40
    assert rt["lrs"][0] == pytest.approx(1e-5) and all(b > a for a, b in zip(rt["lrs"], rt["lrs"][1:]))
    assert r["lr"] in GRID and r["prior"] is None and r["weight_prior"] == 0.0
    if rt["lr_div"] is not None:
        assert r["lr_unsnapped"] <= rt["lr_div"] / tune.SAFETY * (1 + 1e-9)
    assert r["variant"] == "lora" and r["range_test_lr"] == r["lr"]
    json.dumps(r)   # JSON-serializable
    # the same curve with priors: the proposal moves toward the prior, the range test's own does not
    prior_rows = [*sweep("tiny_ckpt", "lora", 1e-5), *sweep("tiny_ckpt", "dora", 1e-5)]
    with_prior = tune.propose_lr(tiny_task, spec, priors=prior_rows, curve=rt)
    assert with_prior["prior"]["kind"] == "same" and with_prior["range_test_lr"] == r["range_test_lr"]
    assert with_prior["lr_unsnapped"] < r["lr_unsnapped"]


def test_the_loraplus_ratio_is_kept_in_the_range_test(tiny_task, monkeypatch):
    """Every parameter group's rate is scaled together: LoRA+'s B group stays ratio x A's."""
    from lorazoo.train import Trainer

    seen = []
    step = Trainer._step

    def spy(self, group, total, warm):
        out = step(self, group, total, warm)
        seen.append(sorted(g["lr"] for g in self.optimizer.param_groups))
        return out

    monkeypatch.setattr(Trainer, "_step", spy)
    spec = AdapterSpec.preset("loraplus", targets=["fc1", "fc2"], loraplus_ratio=16.0)
    tune.range_test(__import__("lorazoo.tasks.base", fromlist=["get_task"]).get_task(tiny_task), spec,
                    steps=5, lr_min=1e-4, lr_max=1e-3)
    assert len(seen) == 5
    for lrs in seen:
        assert lrs[-1] / lrs[0] == pytest.approx(16.0)
    assert seen[-1][0] / seen[0][0] == pytest.approx(10.0)


def test_propose_refuses_bad_input(tiny_task):
    with pytest.raises(LorazooError, match="spec must be"):
        tune.propose_lr(tiny_task, 3, priors=None)
    with pytest.raises(LorazooError, match="unknown variant"):
        tune.propose_lr(tiny_task, "no_such_variant", priors=None)
    with pytest.raises(LorazooError, match="lr_max must be above"):
        tune.propose_lr(tiny_task, AdapterSpec.preset("lora", targets=["fc1"]), priors=None, lr_min=1e-2, lr_max=1e-3)
    with pytest.raises(LorazooError, match="unknown task"):
        tune.propose_lr("no_such_task", "lora", priors=None)
    with pytest.raises(LorazooError, match="grid"):
        tune.propose_lr(tiny_task, "lora", grid=[], priors=None)


def test_variant_of_a_spec():
    assert tune.variant_of(AdapterSpec.preset("dora")) == "dora"
    assert tune.variant_of(AdapterSpec.preset("loraplus", rank=4)) == "loraplus"
    assert tune.variant_of(AdapterSpec.preset("lora")) == "lora"


# --- the command -----------------------------------------------------------------------------------
def test_cli_refuses_bad_flags(capsys):
    from lorazoo.cli import main

    assert main(["tune", "--prior", "x.csv", "--no-prior"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["tune", "--data", "f.csv"]) == 2
    assert "need --model" in capsys.readouterr().err
    assert main(["tune", "--model", "m", "--task", "sentiment", "--data", "f.csv"]) == 2
    assert "drop --task" in capsys.readouterr().err
    assert main(["tune", "--grid", "1e-3,x"]) == 2
    assert "--grid" in capsys.readouterr().err


def test_cli_on_the_tiny_task(tiny_task, tmp_path, capsys):
    from lorazoo.cli import main

    out = tmp_path / "t.json"
    assert main(["tune", "--task", tiny_task, "--targets", "fc1,fc2", "--steps", "30", "--lr-max", "10",
                 "--prior", str(TRIALS_CSV), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "proposed learning rate for lora on tiny_ckpt" in text
    r = json.loads(out.read_text())
    assert r["lr"] in GRID and r["prior"]["kind"] == "variant"   # a task the study never ran: LoRA's rates elsewhere
    assert r["prior_source"] == str(TRIALS_CSV)


def test_cli_on_your_own_model_and_data(tmp_path, capsys):
    from lorazoo.cli import main
    from own_models import rows, tiny_bert, write

    model, data = tiny_bert(tmp_path / "bert"), write(rows(96), tmp_path / "train.csv")
    out = tmp_path / "own.json"
    assert main(["tune", "--model", str(model), "--data", str(data), "--variant", "dora", "--steps", "20",
                 "--lr-max", "1", "--max-length", "16", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["task"] == "own" and r["variant"] == "dora" and r["lr"] in GRID
    # your own data has no stored sweep: the prior is DoRA's best rates on the study's tasks
    assert r["prior"]["kind"] == "variant" and set(r["prior"]["evidence"]) == {
        "sentiment/dora", "nlg_sentiment/dora", "fashion/dora"}
    assert "proposed learning rate for dora on own" in capsys.readouterr().out


# --- the claim ------------------------------------------------------------------------------
QUICK = {"limit": 768, "seed": 0, "max_length": 48, "test_size": 400}   # the quick suite's sentiment trials


@pytest.mark.slow
def test_proposal_lands_within_one_grid_step_of_the_sweep_on_sentiment():
    """For LoRA, DoRA and LoRA+, one range test each (80 steps, batch 8, as the quick suite's runs)
    and two proposals from it: with the shipped priors minus the variant under test (leave-one-out:
    only the other variants' sweeps inform it), and with no priors. Both must land within one grid
    step of the best rate of the full 6-rate sweep in docs/study/trials.csv."""
    from lorazoo.tasks.base import get_task

    best = tune.best_rates(tune.load_priors(TRIALS_CSV))
    task = get_task("sentiment", limit=QUICK["limit"], seed=QUICK["seed"],
                    options={"max_length": QUICK["max_length"], "test_size": QUICK["test_size"]})
    measured = {}
    for variant in ("lora", "dora", "loraplus"):
        target = best[("sentiment", variant)]["lr"]
        curve = tune.range_test(task, AdapterSpec.preset(variant), batch_size=8, seed=0)
        loo = tune.propose_lr(task, variant, curve=curve, priors="default", exclude_variants=[variant])
        alone = tune.propose_lr(task, variant, curve=curve, priors=None)
        assert loo["prior"]["kind"] == "task" and variant not in " ".join(loo["prior"]["evidence"]).split("/")
        measured[variant] = {"sweep_best": target, "loo": loo["lr"], "loo_unsnapped": loo["lr_unsnapped"],
                             "alone": alone["lr"], "alone_unsnapped": alone["lr_unsnapped"],
                             "lr_div": curve["lr_div"], "seconds": curve["seconds"]}
    print(json.dumps(measured, indent=1))
    for variant, m in measured.items():
        assert tune.grid_steps(m["loo"], m["sweep_best"]) <= 1, (variant, m)
        assert tune.grid_steps(m["alone"], m["sweep_best"]) <= 1, (variant, m)
