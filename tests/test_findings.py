"""The findings' verdicts on synthetic trial rows with known answers, their report section, the new
suites, and the study option keep_adapter (a trial's adapter kept for the analyses)."""
import os

import pytest

from lorazoo.study import findings as F
from lorazoo.study.grid import call_args, expand, trial_id, validate
from lorazoo.study.store import Store
from lorazoo.study.suites import BASELINES, SUITES, suite

HERE = os.path.dirname(os.path.abspath(__file__))
NOISE = [-0.002, 0.0, 0.002]  # per seed: sd 0.002; cell k of a helper gets it rotated by k, so that two
# cells' seeds are not perfectly correlated (their seed-by-seed differences have sd 0.0035)


def row(task, variant, lr, seed, metric, *, before=0.5, losses=None, peak=1000.0, spec=None, **cfg):
    config = {"task": task, "variant": variant, "lr": lr, "seed": seed, "epochs": 1.0, **cfg}
    sp = {"form": "lora", "rank": 8, "rank_dropout": 0.0, "dropout": 0.0, **(spec or {})}
    for k in ("rank", "rank_dropout", "dropout", "alpha"):
        if k in cfg:
            sp[k] = cfg[k]
    return {"id": trial_id(config), "status": "done", "config": config, "spec": sp, "metric": metric,
            "metric_before": before, "metric_name": "accuracy", "losses": losses or [0.7, 0.5, 0.4],
            "peak_rss_mb": peak, "result": {}, "trainable_params": 1, "wall_seconds": 1.0}


def grid_rows(curves: dict, task="t", seeds=(0, 1, 2), **kw):
    """Rows from {variant: {lr: mean}}; seed i of the k-th variant adds NOISE[(i + k) % 3]."""
    return [row(task, v, lr, s, m + NOISE[(s + k) % 3], **kw) for k, (v, by_lr) in enumerate(curves.items())
            for lr, m in by_lr.items() for s in seeds]


def verdict(key, trials):
    return next(v for f, v in F.evaluate(trials) if f.key == key)


LRS = [1e-5, 1e-4, 5e-4, 1e-3, 5e-3]


def flat(m):
    return {lr: m for lr in LRS}


def test_cells_of_the_same_seeds_are_compared_seed_by_seed():
    from lorazoo.study.verdicts import diff, stats

    base = [0.70, 0.78, 0.74]  # seed effects 40x the shift below
    a = [row("t", "lora", 1e-3, s, m) for s, m in enumerate(base)]
    b = [row("t", "dora", 1e-3, s, m + 0.01 + e) for s, (m, e) in enumerate(zip(base, [0.001, -0.001, 0.0]))]
    d, se = diff(stats(b), stats(a))  # paired: the SE of the differences 0.011, 0.009, 0.010
    assert d == pytest.approx(0.01) and se == pytest.approx(0.001 / 3 ** 0.5)
    other = [dict(t, config={**t["config"], "seed": t["config"]["seed"] + 3}) for t in b]  # other seeds: pooled
    d, se = diff(stats(other), stats(a))
    assert d == pytest.approx(0.01) and se == pytest.approx((2 * 0.04 ** 2 / 3) ** 0.5, rel=0.05)
    assert diff(tuple(stats(b)), tuple(stats(a)))[1] == pytest.approx(se, rel=0.05)  # plain tuples: pooled


# --- the unified study's findings --------------------------------------------------------------
def test_tuned_lora_more_than_noise_below_the_best_variant_does_not_hold():
    trials = grid_rows({"lora": {1e-5: 0.55, 1e-4: 0.70, 1e-3: 0.60}, "dora": {1e-5: 0.6, 1e-4: 0.80, 1e-3: 0.75}})
    v = verdict("tuned_lora", trials)
    assert v.verdict == F.FAILS and "dora" in v.ours and "-0.100" not in v.ours and "+0.100" in v.ours


def test_tuned_lora_within_noise_holds_and_one_seed_is_not_testable():
    trials = grid_rows({"lora": {1e-5: 0.6, 1e-4: 0.800, 1e-3: 0.6}, "dora": {1e-5: 0.6, 1e-4: 0.801, 1e-3: 0.7}})
    assert verdict("tuned_lora", trials).verdict == F.HOLDS
    one = grid_rows({"lora": {1e-5: 0.6, 1e-4: 0.70, 1e-3: 0.6}, "dora": {1e-4: 0.80}}, seeds=(0,))
    v = verdict("tuned_lora", one)
    assert v.verdict == F.UNTESTABLE and "seed" in v.reason


def test_tuned_lora_needs_a_bracketed_rate_and_a_lora_that_learned():
    edge = grid_rows({"lora": {1e-5: 0.6, 1e-4: 0.7, 1e-3: 0.8}, "dora": {1e-4: 0.9}})
    v = verdict("tuned_lora", edge)
    assert v.verdict == F.UNTESTABLE and "edge of its grid" in v.reason
    flat_ = grid_rows({"lora": {1e-5: 0.50, 1e-4: 0.505, 1e-3: 0.49}, "dora": {1e-4: 0.9}})
    v = verdict("tuned_lora", flat_)
    assert v.verdict == F.UNTESTABLE and "did not learn" in v.reason


def test_learning_rate_dominates_holds_when_rates_move_scores_more_than_variants_differ():
    peak = {1e-5: 0.50, 1e-4: 0.80, 5e-4: 0.70, 1e-3: 0.55, 5e-3: 0.50}
    trials = grid_rows({v: {lr: m + 0.01 * i for lr, m in peak.items()} for i, v in enumerate(["lora", "dora", "eva"])})
    assert verdict("lr_dominates", trials).verdict == F.HOLDS
    trials = grid_rows({"lora": flat(0.60), "dora": flat(0.80), "eva": {**flat(0.70), 1e-5: 0.69}})
    assert verdict("lr_dominates", trials).verdict == F.FAILS


def test_study_findings_look_only_at_the_studys_variants():
    peak = {1e-5: 0.50, 1e-4: 0.80, 5e-4: 0.70, 1e-3: 0.55, 5e-3: 0.50}
    trials = grid_rows({v: peak for v in ["full_ft", "bitfit", "lorma_pi"]})
    assert verdict("lr_dominates", trials).verdict == F.NOT_RUN


def test_gradient_flow_variants_ahead_low_and_behind_high():
    lora = {1e-5: 0.55, 1e-4: 0.80, 5e-4: 0.70, 1e-3: 0.55}
    fast = {1e-5: 0.75, 1e-4: 0.78, 5e-4: 0.50, 1e-3: 0.50}
    trials = grid_rows({"lora": lora, "eva": fast, "pissa": fast, "loraplus": fast})
    v = verdict("gradient_flow", trials)
    assert v.verdict == F.HOLDS and "3/3 ahead" in v.ours
    trials = grid_rows({"lora": lora, "eva": lora, "pissa": lora})  # no lead anywhere
    assert verdict("gradient_flow", trials).verdict == F.FAILS


def test_gradient_flow_without_a_rate_5x_below_lora_best_is_not_testable():
    trials = grid_rows({"lora": {1e-4: 0.8, 5e-4: 0.6}, "eva": {1e-4: 0.7, 5e-4: 0.5}})
    v = verdict("gradient_flow", trials)
    assert v.verdict == F.UNTESTABLE and "5x below" in v.ours + v.reason


def test_paper_collapse_set_from_its_table():
    assert F.paper_collapsed() == {"melora", "rslora", "loraplus", "pissa", "lora_ga", "nzlora", "goat", "loramoe"}


def test_collapse_agreeing_with_the_paper_holds_and_the_reverse_does_not():
    collapse = {1e-4: 0.80, 5e-4: 0.52}   # floor 0.5: lost nearly all its gain at 5e-4
    survive = {1e-4: 0.80, 5e-4: 0.78}
    names_c, names_s = ["melora", "loraplus", "pissa"], ["hira", "dora", "adalora", "moslora"]
    curves = {"lora": survive, **{v: collapse for v in names_c}, **{v: survive for v in names_s}}
    v = verdict("collapse", grid_rows(curves))
    assert v.verdict == F.HOLDS and "8/8" in v.ours
    curves = {"lora": survive, **{v: survive for v in names_c}, **{v: collapse for v in names_s}}
    v = verdict("collapse", grid_rows(curves))
    assert v.verdict == F.FAILS and "1/8" in v.ours


def test_collapse_and_gradient_flow_need_a_rate_near_5x_lora_best():
    """On the 1-5 grid with LoRA's best at 5e-4 the neighbours are 2x and 10x: the paper's 5x is not there."""
    lora = {1e-5: 0.50, 1e-4: 0.55, 5e-4: 0.80, 1e-3: 0.75, 5e-3: 0.52}
    fast = {1e-5: 0.50, 1e-4: 0.75, 5e-4: 0.78, 1e-3: 0.52, 5e-3: 0.50}
    curves = {"lora": lora, **{v: fast for v in ["eva", "pissa", "loraplus"]}, "hira": lora, "dora": lora}
    v = verdict("collapse", grid_rows(curves))
    assert v.verdict == F.UNTESTABLE and "0.001 = 2x, 0.005 = 10x" in v.reason
    assert "at 0.001 collapsed eva, loraplus, pissa" in v.reason and "at 0.005 collapsed dora, eva, hira" in v.reason
    late = {1e-5: 0.50, 1e-4: 0.50, 5e-4: 0.50, 1e-3: 0.52, 5e-3: 0.80}  # not learning yet below its best rate
    v = verdict("collapse", grid_rows({**curves, "adalora": late}))
    assert "adalora" not in v.reason
    v = verdict("gradient_flow", grid_rows(curves))
    assert v.verdict == F.UNTESTABLE and "near 5x" in v.reason and "at 0.001: eva -0.230" in v.reason
    assert verdict("collapse", grid_rows({k: {**c, 2.5e-3: c[5e-3]} for k, c in curves.items()})).verdict != F.UNTESTABLE


def test_structured_forms_peaking_10x_above_lora_hold():
    lora = {1e-5: 0.6, 1e-4: 0.80, 1e-3: 0.60}
    trials = grid_rows({"lora": lora, "hira": {1e-5: 0.5, 1e-4: 0.60, 1e-3: 0.80},
                        "dora": {1e-5: 0.5, 1e-4: 0.55, 1e-3: 0.79}})
    v = verdict("structured_rate", trials)
    assert v.verdict == F.HOLDS and "2/2" in v.ours
    trials = grid_rows({"lora": lora, "hira": {1e-5: 0.6, 1e-4: 0.80, 1e-3: 0.70}})
    assert verdict("structured_rate", trials).verdict == F.FAILS
    short = grid_rows({"lora": {1e-5: 0.6, 1e-4: 0.80, 5e-4: 0.60}, "hira": {1e-5: 0.5, 1e-4: 0.6, 5e-4: 0.8}})
    assert verdict("structured_rate", short).verdict == F.UNTESTABLE  # no rate 10x above LoRA's best


def test_dora_memory_compares_what_a_step_keeps_for_backward():
    def rows(saved):
        out = []
        for v, mb in saved.items():
            for t in grid_rows({v: {1e-4: 0.8}}, peak=1000.0):
                out.append({**t, "result": {"saved_mb": mb}})
        return out
    v = verdict("dora_memory", rows({"lora": 10.0, "dora": 17.5, "hira": 12.0}))
    assert v.verdict == F.HOLDS and "+75%" in v.ours and "DoRA 1 of 3" in v.ours
    # a seed's first batch sets the padded length: seeds a variant lacks are left out of every mean
    long = [{**t, "result": {"saved_mb": 30.0}} for t in grid_rows({"hira": {1e-4: 0.8}}, seeds=(3,))]
    assert "hira 12.0" in verdict("dora_memory", rows({"lora": 10.0, "dora": 11.0, "hira": 12.0}) + long).ours
    v = verdict("dora_memory", rows({"lora": 10.0, "dora": 12.0, "hira": 15.0, "denselora": 14.0}))
    assert v.verdict == F.FAILS and "DoRA 3 of 4" in v.ours and "hira 15.0, denselora 14.0" in v.ours
    old = grid_rows({"lora": {1e-4: 0.8}}, peak=1000.0) + grid_rows({"dora": {1e-4: 0.8}}, peak=1100.0)
    v = verdict("dora_memory", old)  # rows from before saved_mb was recorded: peak RSS is no measure
    assert v.verdict == F.UNTESTABLE and "1100 MB" in v.reason
    assert verdict("dora_memory", grid_rows({"lora": {1e-4: 0.8}})).verdict == F.NOT_RUN


# --- the seeds' claims -------------------------------------------------------------------------
def drop_rows(means: dict, noise=NOISE, seeds=(0, 1, 2), inp=None):
    out = [row("t", "lora", 1e-3, s, m + noise[(s + k) % 3], rank_dropout=p)
           for k, (p, m) in enumerate(means.items()) for s in seeds]
    for q, m in (inp or {}).items():
        out += [row("t", "lora", 1e-3, s, m + noise[(s + 1) % 3], dropout=q) for s in seeds]
    return out


def test_droplora_gain_holds_fails_or_is_unresolved():
    sweep = {0.0: 0.80, 0.1: 0.81, 0.3: 0.82, 0.5: 0.805}
    v = verdict("droplora_gain", drop_rows(sweep, inp={0.1: 0.8}))
    assert v.verdict == F.HOLDS and "input dropout 0.1" in v.ours
    assert verdict("droplora_best", drop_rows(sweep)).verdict == F.HOLDS
    v = verdict("droplora_gain", drop_rows({0.0: 0.80, 0.1: 0.80, 0.3: 0.790, 0.5: 0.79}))
    assert v.verdict == F.FAILS  # 0.3 is 0.01 below LoRA, well resolved
    noisy = [-0.03, 0.0, 0.03]
    v = verdict("droplora_gain", drop_rows({0.0: 0.80, 0.3: 0.805, 0.5: 0.8}, noise=noisy))
    assert v.verdict == F.UNTESTABLE and "more seeds" in v.reason


def test_droplora_best_rate_elsewhere():
    v = verdict("droplora_best", drop_rows({0.0: 0.80, 0.1: 0.83, 0.3: 0.80, 0.5: 0.79}))
    assert v.verdict == F.FAILS and "best 0.1" in v.ours
    assert verdict("droplora_best", drop_rows({0.0: 0.8, 0.3: 0.8})).verdict == F.UNTESTABLE
    assert verdict("droplora_best", drop_rows({0.0: 0.80, 0.1: 0.79, 0.3: 0.83, 0.5: 0.78})).verdict == F.HOLDS
    tie = verdict("droplora_best", drop_rows({0.0: 0.80, 0.1: 0.8295, 0.3: 0.83, 0.5: 0.78}))
    assert tie.verdict == F.UNTESTABLE and "above 0.1" in tie.reason  # highest mean, but by less than noise


def test_lorma_auc_reduction_against_30_percent():
    def rows(lorma_loss):
        out = grid_rows({"lora": {1e-4: 0.7, 1e-3: 0.80, 1e-2: 0.6}}, losses=[1.0, 1.0, 1.0])
        out += [row("t", "lorma_plus", 1e-3, s, 0.80 + NOISE[s], losses=[lorma_loss * (1 + NOISE[s])] * 3)
                for s in range(3)]
        return out

    v = verdict("lorma_auc", rows(0.6))
    assert v.verdict == F.HOLDS and "+40%" in v.ours
    assert verdict("lorma_auc", rows(0.9)).verdict == F.FAILS
    assert verdict("lorma_par", rows(0.6)).verdict == F.HOLDS


def test_lorma_below_lora_is_not_on_par():
    trials = grid_rows({"lora": {1e-4: 0.7, 1e-3: 0.80, 1e-2: 0.6}, "lorma_pi": {1e-3: 0.60}})
    assert verdict("lorma_par", trials).verdict == F.FAILS
    one_rate = grid_rows({"lora": {1e-3: 0.80}, "lorma_pi": {1e-3: 0.60}})
    assert verdict("lorma_par", one_rate).verdict == F.UNTESTABLE


def test_lora_rank_one_on_q_v():
    def rows(r1):
        return [row("t", "lora", 1e-3, s, (r1 if r == 1 else 0.80) + NOISE[s], rank=r, targets=["query", "value"])
                for r in (1, 2, 8, 64) for s in range(3)]

    assert verdict("lora_rank1", rows(0.799)).verdict == F.HOLDS
    v = verdict("lora_rank1", rows(0.70))
    assert v.verdict == F.FAILS and "r=1: 0.700" in v.ours


def test_lora_against_full_fine_tuning_and_the_other_baselines():
    lrs = (1e-5, 1e-4, 1e-3, 1e-2)

    def rows(lora, ft, seeds=(0, 1, 2), noise=NOISE):
        out = [row("t", "lora", lr, s, m + noise[s], rank=8, alpha=16, targets=["query", "value"])
               for lr, m in zip(lrs, lora) for s in seeds]
        out += [row("t", "full_ft", lr, s, m + noise[(s + 1) % 3]) for lr, m in zip(lrs, ft) for s in seeds]
        return out + [row("t", "bitfit", lr, s, 0.70 + noise[s]) for lr in lrs for s in seeds]

    v = verdict("lora_baselines", rows((0.6, 0.80, 0.79, 0.5), (0.6, 0.795, 0.7, 0.5)))
    assert v.verdict == F.HOLDS and "full_ft 0.795" in v.ours and "bitfit 0.700" in v.ours and "(-0.100)" in v.ours
    assert verdict("lora_baselines", rows((0.6, 0.75, 0.7, 0.5), (0.6, 0.80, 0.7, 0.5))).verdict == F.FAILS
    wide = [-0.02, 0.0, 0.02]  # sd 0.02: the interval reaches past the 0.01 margin
    assert verdict("lora_baselines", rows((0.6, 0.80, 0.7, 0.5), (0.6, 0.80, 0.7, 0.5), noise=wide)).verdict \
        == F.UNTESTABLE
    edge = verdict("lora_baselines", rows((0.6, 0.80, 0.7, 0.5), (0.9, 0.80, 0.7, 0.5)))
    assert edge.verdict == F.UNTESTABLE and "not bracketed" in edge.reason
    assert verdict("lora_baselines", [r for r in rows((0.6,) * 4, (0.6,) * 4)
                                      if r["config"]["variant"] != "full_ft"]).verdict == F.NOT_RUN


def test_every_finding_says_not_run_without_trials_and_the_section_is_left_out():
    assert all(v.verdict == F.NOT_RUN for _, v in F.evaluate([]))
    assert F.markdown([]) is None
    text = F.markdown(grid_rows({"lora": {1e-4: 0.70}, "dora": {1e-4: 0.80}}))
    assert text.startswith("## Findings") and "| Tuned LoRA matches the best variant |" in text
    table = text.split("### ")[0]
    assert "Rank dropout beats LoRA" not in table  # claims without trials are listed once, at the end
    missing = text.split("### Not run in this study")[1]
    assert "- Rank dropout beats LoRA (DropLoRA, Tables 1-4):" in missing and "--suite droplora" in missing


def test_the_report_has_a_findings_section(tmp_path):
    from lorazoo.study.report import report

    db = tmp_path / "s.sqlite"
    trials = grid_rows({"lora": {1e-5: 0.55, 1e-4: 0.70, 1e-3: 0.6}, "dora": {1e-5: 0.6, 1e-4: 0.80, 1e-3: 0.7}})
    with Store(db) as s:
        s.save_study("s", {"name": "s"})
        s.add_trials("s", [t["config"] for t in trials])
        for t in trials:
            s.finish("s", t["id"], {"status": "done", "spec": t["spec"], "wall_seconds": 1.0,
                                    "result": {k: t[k] for k in ("metric", "metric_before", "metric_name", "losses")}})
    text = report(str(db), str(tmp_path / "r"), with_plots=False)
    assert "## Findings" in text and "Tuned LoRA matches the best variant: does not hold" in text
    assert "## Findings" in (tmp_path / "r" / "report.md").read_text()


# --- suites -------------------------------------------------------------------------------------
NEW_SUITES = ["paper", "droplora", "lorma", "lora_paper", "findings_smoke"]


@pytest.mark.parametrize("name", NEW_SUITES)
def test_new_suites_expand_and_validate(name):
    import lorazoo

    listed = {v for sw in SUITES[name]["sweeps"] for v in sw["grid"].get("variant", [])}
    missing = sorted(listed - set(lorazoo.variants()))
    assert set(missing) <= set(BASELINES), missing  # only baselines may be missing
    cfg = suite(name)  # leaves the unregistered baselines out, and says so
    trials = expand(cfg)
    assert trials and len({trial_id(t) for t in trials}) == len(trials)
    assert not {t["variant"] for t in trials} & set(missing)
    validate(cfg, known_tasks=["sentiment", "nlg_sentiment", "fashion"])
    if missing:
        assert "not registered yet: " + ", ".join(missing) in cfg["description"]
        pytest.skip(f"baseline presets not registered yet: {', '.join(missing)} (the rest validated)")


def test_paper_suite_is_the_study_grid():
    trials = expand(suite("paper"))
    assert {t["task"] for t in trials} == {"sentiment", "nlg_sentiment", "fashion"}
    nlu = [t for t in trials if t["task"] == "sentiment"]
    assert {t["variant"] for t in nlu} == set(F.STUDY_VARIANTS) and len(F.STUDY_VARIANTS) == 20
    assert {t["seed"] for t in nlu} == {0, 1, 2} and len(nlu) == 20 * 8 * 3
    lrs = sorted({t["lr"] for t in nlu})  # the study's grid, and 5x LoRA's best here (5e-4; the study's 1e-4)
    assert set(lrs) == {1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2}
    assert all(t["test_size"] >= 2000 for t in nlu)
    for task in ("fashion", "nlg_sentiment"):
        mine = [t for t in trials if t["task"] == task]
        assert "lora" in {t["variant"] for t in mine} and len({t["lr"] for t in mine}) >= 3
        assert len({t["seed"] for t in mine}) >= 2
    assert all(t["targets"] == "all-conv" for t in trials if t["task"] == "fashion")


def test_lora_paper_keeps_the_adapters_the_analyses_need():
    trials = expand(suite("lora_paper"))
    kept = {(t["rank"], t["seed"]) for t in trials if t.get("keep_adapter")}
    assert {(8, 0), (64, 0), (64, 1)} <= kept
    qv = [t for t in trials if t.get("targets") == ["query", "value"]]
    assert {t["rank"] for t in qv} == {1, 2, 4, 8, 64}
    for prefix in ("prefix_embed", "prefix_layer"):  # they peaked at 1e-2: the grid goes past it
        assert max(t["lr"] for t in trials if t["variant"] == prefix) > 1e-2


# --- keep_adapter ------------------------------------------------------------------------------
def test_keep_adapter_is_a_study_option_not_passed_to_the_trial():
    cfg = {"task": "sentiment", "variant": "lora", "lr": 1e-3, "keep_adapter": True}
    _, _, kwargs = call_args(cfg)
    assert "keep_adapter" not in kwargs
    assert trial_id(cfg) != trial_id({k: v for k, v in cfg.items() if k != "keep_adapter"})
    from lorazoo.study.trial import resume_options
    from study_fake import tiny_run

    assert resume_options(tiny_run, {}, {"trial_dir": "d", "keep_adapter": True}) == {"out_dir": "d"}
    assert resume_options(tiny_run, {}, {"trial_dir": "d", "checkpoint_every": None}) == {}


def test_a_kept_adapter_survives_the_trial(tmp_path, monkeypatch):
    from lorazoo.study.runner import adapter_dir, run_study, trial_dir

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
    study = {"name": "k", "trial_fn": "study_fake:tiny_run",
             "grid": {"task": ["tiny_ckpt"], "variant": ["lora"], "lr": [0.02], "keep_adapter": [True, False]},
             "fixed": {"rank": 4, "epochs": 1, "batch_size": 16}}
    db = tmp_path / "s.sqlite"
    assert run_study(db, study, checkpoint_every=2, known_tasks=["tiny_ckpt"], log=lambda m: None)["done"] == 2
    with Store(db) as s:
        rows = {t["config"]["keep_adapter"]: t for t in s.trials("k")}
    kept = adapter_dir(db, rows[True]["id"])
    assert rows[True]["result"]["adapter_dir"] == str(kept)
    assert (kept / "adapter_config.json").is_file() or any(kept.iterdir())
    assert not (kept / "checkpoints").exists() and not trial_dir(db, rows[True]["id"]).exists()
    assert "adapter_dir" not in rows[False]["result"] and not adapter_dir(db, rows[False]["id"]).exists()
    moved = tmp_path / "elsewhere" / "s.sqlite"  # a study file moved (or checked in) with its adapters
    moved.parent.mkdir()
    os.rename(db, moved)
    os.rename(f"{db}.adapters", f"{moved}.adapters")
    with Store(moved) as s:
        assert s.trial("k", rows[True]["id"])["result"]["adapter_dir"] == str(adapter_dir(moved, rows[True]["id"]))


def test_lorma_order_post_against_pre():
    curve = {1e-4: 0.6, 1e-3: 0.80, 1e-2: 0.7}
    pre = [row("s", "lorma_plus", lr, s, m + NOISE[s]) for lr, m in curve.items() for s in range(3)]
    post = [row("s", "lorma_plus", lr, s, m + (lr == 1e-3) * 0.001 + NOISE[(s + 1) % 3], lorma_order="post",
                spec={"lorma_order": "post"}) for lr, m in curve.items() for s in range(3)]
    v = verdict("lorma_order", pre + post)
    assert v.verdict == F.HOLDS and "+0.001" in v.ours
    worse = [dict(t, metric=t["metric"] - 0.05) for t in post]
    assert verdict("lorma_order", pre + worse).verdict == F.FAILS
    near = [dict(t, metric=t["metric"] + 0.009) for t in post]  # 0.010 ± 0.003: straddles the margin
    assert "straddles" in verdict("lorma_order", pre + near).reason
    assert verdict("lorma_order", pre).verdict == F.NOT_RUN
    assert verdict("lorma_order", [t for t in pre + post if t["config"]["seed"] == 0]).verdict == F.UNTESTABLE
    edge = [t for t in post if t["config"]["lr"] != 1e-2]  # post's best at the top of its grid: not tuned
    edge = [dict(t, metric=0.9) if t["config"]["lr"] == 1e-3 else t for t in edge]
    assert "not tuned" in verdict("lorma_order", pre + edge).reason
