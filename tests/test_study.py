"""The study runner, its SQLite store and its report, with a fake trial function (study_fake.py)."""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from lorazoo import cli
from lorazoo.study.errors import GridError, StudyError
from lorazoo.study.grid import call_args, expand, trial_id, validate
from lorazoo.study.report import loss_auc, report
from lorazoo.study.runner import run_study
from lorazoo.study.store import Store
from lorazoo.study.suites import SUITES, suite

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = "study_fake:trial"


@pytest.fixture(autouse=True)
def _fake_on_path(monkeypatch):
    """Trial processes import study_fake from this folder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p))


def config(name="t", **grid):
    g = {"task": ["toy"], "variant": ["lora"], "lr": [1e-4, 1e-3], "seed": [0]}
    g.update(grid)
    return {"name": name, "trial_fn": FAKE, "grid": g, "fixed": {"epochs": 1, "sleep": 0.01}}


def quiet(_msg):
    pass


# --- grid -----------------------------------------------------------------------------------------
def test_trial_ids_are_stable_hashes_of_the_config():
    a = {"task": "toy", "variant": "lora", "lr": 1e-3, "seed": 0, "rank": 4}
    assert trial_id(a) == trial_id(dict(reversed(list(a.items()))))
    assert trial_id({**a, "seed": 1}) != trial_id(a)
    assert trial_id({"task": "toy", "variant": "lora", "lr": 1}) == trial_id({"task": "toy", "variant": "lora",
                                                                            "lr": 1.0, "seed": 0})
    assert trial_id(a) == "%s" % trial_id(json.loads(json.dumps(a)))  # survives a JSON round trip


def test_grid_expands_sweeps_and_routes_keys():
    cfg = config(rank=[4, 8], seed=[0, 1])
    cfg["sweeps"] = [{"grid": {"task": ["toy2"], "variant": "all", "lr": [1e-3]}}]
    trials = expand(cfg)
    import lorazoo

    assert len(trials) == 2 * 2 * 2 + len(lorazoo.variants())
    assert len({trial_id(t) for t in trials}) == len(trials)
    task, spec, kwargs = call_args(trials[0])
    assert task == "toy" and spec.rank == 4 and spec.seed == 0
    assert kwargs == {"lr": 1e-4, "epochs": 1.0, "seed": 0, "sleep": 0.01}


@pytest.mark.parametrize("grid, words", [
    ({"variant": ["lora", "no_such_variant"]}, "unknown variant 'no_such_variant'; known variants: "),
    ({"lr": [1e-3, -1e-4]}, "lr must be > 0, got -0.0001"),
    ({"task": ["toy", "no_such_task"]}, "unknown task 'no_such_task'; known tasks: toy, toy2"),
    ({"rank": [0]}, "rank must be >= 1"),
    ({"lr": []}, "grid axis 'lr' must be a non-empty list"),
])
def test_a_bad_grid_fails_before_any_trial_starts(tmp_path, grid, words):
    db = tmp_path / "s.sqlite"
    log = tmp_path / "calls.log"
    os.environ["STUDY_FAKE_LOG"] = str(log)
    try:
        with pytest.raises(GridError) as e:
            run_study(db, config(**grid), log=quiet)
    finally:
        del os.environ["STUDY_FAKE_LOG"]
    assert words in str(e.value)
    assert not db.exists() and not log.exists()


def test_the_cli_reports_a_bad_grid_clearly(tmp_path, capsys):
    rc = cli.main(["study", "--trial-fn", FAKE, "--tasks", "toy", "--variants", "lora", "nope",
                   "--lrs", "1e-3", "-0.1", "--db", str(tmp_path / "s.sqlite")])
    err = capsys.readouterr().err
    assert rc == 2 and "invalid grid (no trial was run)" in err
    assert "unknown variant 'nope'" in err and "lr must be > 0" in err
    assert not (tmp_path / "s.sqlite").exists()


def test_cli_flags_build_and_override_a_study(capsys):
    assert cli.main(["study", "--suite", "smoke", "--limit", "10", "--grid", "rank=4,8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 trials would be recorded in runs/smoke.sqlite" in out and '"limit": 10' in out and '"rank": 8' in out
    assert cli.main(["study", "--trial-fn", FAKE, "--tasks", "toy", "--variants", "all", "--lrs", "1e-3",
                     "--set", "sleep=0", "--name", "x", "--db", "/nonexistent/x.sqlite", "--dry-run"]) == 0
    import lorazoo

    assert f"{len(lorazoo.variants())} trials would be recorded in /nonexistent/x.sqlite" in capsys.readouterr().out
    assert cli.main(["study"]) == 2 and "nothing to run" in capsys.readouterr().err


# --- store ----------------------------------------------------------------------------------------
def test_the_sqlite_schema_round_trips(tmp_path):
    db = tmp_path / "s.sqlite"
    cfg = {"task": "toy", "variant": "lora", "lr": 1e-3, "seed": 0, "rank": 4, "targets": ["q", "v"]}
    bad = {**cfg, "seed": 1}
    result = {"task": "toy", "spec": {"rank": 4}, "lr": 1e-3, "metric_name": "accuracy", "metric_before": 0.5,
              "metric": 0.8125, "metrics_per_epoch": [{"epoch": 1, "accuracy": 0.75}, {"epoch": 2, "accuracy": 0.8125}],
              "losses": [0.7, 0.5, float("nan"), 0.25], "train_seconds": 1.5, "trainable_params": 1234,
              "peak_rss_mb": 99.5, "extra": {"nested": [1, 2]}}
    with Store(db) as s:
        s.save_study("t", {"name": "t", "sweeps": []})
        assert s.add_trials("t", [cfg, bad]) == 2
        assert s.add_trials("t", [cfg]) == 0  # already there
        s.mark_running("t", trial_id(cfg), "w1")
        s.mark_running("t", trial_id(bad), "w1")
        s.finish("t", trial_id(cfg), {"status": "done", "result": result, "wall_seconds": 2.0, "peak_rss_mb": 321.0})
        s.finish("t", trial_id(bad), {"status": "failed", "result": None, "error": "Traceback...\nValueError: x",
                                      "wall_seconds": 0.5})
    with Store(db, create=False) as s:  # a fresh connection reads the same
        assert s.studies() == ["t"] and s.study()["config"] == {"name": "t", "sweeps": []}
        t = s.trial("t", trial_id(cfg))
        assert t["status"] == "done" and t["config"] == cfg and t["attempts"] == 1
        r, want = t["result"], result
        assert r["losses"][:2] == want["losses"][:2] and math.isnan(r["losses"][2])
        assert {k: v for k, v in r.items() if k != "losses"} == {k: v for k, v in want.items() if k != "losses"}
        assert t["metrics_per_epoch"] == result["metrics_per_epoch"]
        assert (t["metric"], t["metric_before"], t["wall_seconds"], t["peak_rss_mb"], t["trainable_params"]) == (
            0.8125, 0.5, 2.0, 321.0, 1234)
        f = s.trial("t", trial_id(bad))
        assert f["status"] == "failed" and f["error"].endswith("ValueError: x") and f["result"] is None
        assert s.counts("t") == {"pending": 0, "running": 0, "done": 1, "failed": 1}
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_store_refuses_what_is_not_a_study(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StudyError, match="not a readable SQLite study file"):
        Store(junk)
    with pytest.raises(StudyError, match="no study file"):
        Store(tmp_path / "missing.sqlite", create=False)


# --- runner ---------------------------------------------------------------------------------------
def test_local_runner_records_trials_and_skips_finished_ones(tmp_path):
    db = tmp_path / "s.sqlite"
    cfg = config(lr=[1e-3], fail=[False, True])
    counts = run_study(db, cfg, workers=2, log=quiet)
    assert counts == {"pending": 0, "running": 0, "done": 1, "failed": 1}
    with Store(db) as s:
        rows = s.trials("t")
        done = [r for r in rows if r["status"] == "done"]
        assert all(r["peak_rss_mb"] > 10 and r["wall_seconds"] > 0 and len(r["losses"]) == 20 for r in done)
        assert all("fake failure" in r["error"] for r in rows if r["status"] == "failed")
        nonces = {r["id"]: r["result"]["nonce"] for r in done}
    lines = []
    run_study(db, cfg, workers=2, retry_failed=False, log=lines.append)
    assert "2 trials (0 new), 2 finished, 0 to run" in lines[0]
    run_study(db, cfg, workers=2, log=lines.append)  # failed ones are retried by default
    with Store(db) as s:
        rows = s.trials("t")
        assert {r["id"]: r["result"]["nonce"] for r in rows if r["status"] == "done"} == nonces
        assert sorted(r["attempts"] for r in rows) == [1, 2]


def test_trials_run_in_the_grids_order_when_a_sweep_is_added(tmp_path, monkeypatch):
    """A suite that gains a sweep before another keeps it there: the runner follows the grid's order,
    not the order in which the store first saw the trials."""
    db, log = tmp_path / "s.sqlite", tmp_path / "calls.jsonl"
    monkeypatch.setenv("STUDY_FAKE_LOG", str(log))
    later = config(lr=[1e-2])
    with Store(db) as s:  # stored by an earlier run that was stopped before it began
        s.save_study("t", later)
        s.add_trials("t", expand(later))
    run_study(db, config(lr=[1e-4, 1e-3, 1e-2]), workers=1, log=quiet)
    assert [json.loads(line)["lr"] for line in log.read_text().splitlines()] == [1e-4, 1e-3, 1e-2]


def _wait_for(db, predicate, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            rows = con.execute("SELECT status FROM trials").fetchall()
            con.close()
        except sqlite3.Error:
            rows = []
        if predicate([r[0] for r in rows]):
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the study")


def test_a_killed_study_resumes_without_losing_or_duplicating_trials(tmp_path):
    db, calls = tmp_path / "kill.sqlite", tmp_path / "calls.log"
    cfg = config("kill", lr=[1e-4, 1e-3, 1e-2], seed=[0, 1], task=["toy"])
    cfg["fixed"]["sleep"] = 0.3
    (tmp_path / "study.json").write_text(json.dumps(cfg))
    env = {**os.environ, "STUDY_FAKE_LOG": str(calls)}
    cmd = [sys.executable, "-m", "lorazoo.cli", "study", "--config", str(tmp_path / "study.json"),
           "--db", str(db), "--workers", "2", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(db, lambda st: st.count("done") >= 2 and "running" in st)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.3)
    with Store(db) as s:
        before = {r["id"]: r for r in s.trials("kill")}
    done_before = {i: r for i, r in before.items() if r["status"] == "done"}
    assert 2 <= len(done_before) < 6
    assert any(r["status"] == "running" for r in before.values())  # killed mid-grid
    n_calls = len(calls.read_text().splitlines())
    time.sleep(1.0)
    assert len(calls.read_text().splitlines()) == n_calls  # no orphan trial kept running

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "interrupted" in out.stdout
    with Store(db) as s:
        after = s.trials("kill")
    assert sorted(r["id"] for r in after) == sorted(trial_id(c) for c in expand(cfg))  # each exactly once
    assert all(r["status"] == "done" for r in after)
    for r in after:
        if r["id"] in done_before:  # finished before the kill: kept, not rerun
            assert r["result"]["nonce"] == done_before[r["id"]]["result"]["nonce"]
            assert r["attempts"] == 1 and r["finished"] == done_before[r["id"]]["finished"]
    ran = [json.loads(line) for line in calls.read_text().splitlines()]
    for r in done_before.values():
        key = {"task": r["config"]["task"], "lr": r["config"]["lr"], "seed": r["config"]["seed"]}
        assert ran.count(key) == 1


def test_a_second_runner_on_the_same_study_is_refused(tmp_path):
    db = tmp_path / "s.sqlite"
    with Store(db) as s:
        s.save_study("t", {})
        s.claim("t")
        s.db.execute("UPDATE studies SET runner_pid=?", (os.getppid(),))  # a live process, not us
    with pytest.raises(StudyError, match="is being run by pid"):
        run_study(db, config(lr=[1e-3]), log=quiet)
    assert run_study(db, config(lr=[1e-3]), log=quiet, force=True)["done"] == 1


def test_trial_timeout_marks_the_trial_failed(tmp_path):
    cfg = config(lr=[1e-3])
    cfg["fixed"]["sleep"] = 30
    counts = run_study(tmp_path / "s.sqlite", cfg, timeout=3, log=quiet)
    assert counts["failed"] == 1
    with Store(tmp_path / "s.sqlite") as s:
        assert "timed out after 3 s" in s.trials("t")[0]["error"]


# --- Ray ------------------------------------------------------------------------------------------
def test_ray_backend_missing_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(StudyError, match=r"needs Ray: pip install 'lorazoo\[ray\]'"):
        run_study(tmp_path / "s.sqlite", config(), backend="ray", log=quiet)


@pytest.mark.slow  # starting a local Ray instance takes ~15 s
def test_ray_backend_runs_the_same_trials(tmp_path):
    ray = pytest.importorskip("ray")
    counts = run_study(tmp_path / "s.sqlite", config(), backend="ray", log=quiet)  # starts local Ray
    assert counts["done"] == 2 and not ray.is_initialized()
    with Store(tmp_path / "s.sqlite") as s:
        assert all(r["peak_rss_mb"] > 10 and len(r["losses"]) == 20 for r in s.trials("t"))


# --- report and suites ----------------------------------------------------------------------------
def test_loss_auc_is_normalized_by_steps():
    assert loss_auc([1.0, 1.0, 1.0]) == 1.0
    assert loss_auc([1.0, 0.0]) == 0.5
    assert loss_auc([2.0] * 10 + [0.0] * 10) == pytest.approx(loss_auc([2.0] * 100 + [0.0] * 100), abs=0.06)
    assert math.isnan(loss_auc([]))


def test_report_writes_tables_and_plots(tmp_path, capsys):
    import study_fake

    db = tmp_path / "r.sqlite"
    trials = validate(config(lr=[1e-4, 1e-3, 1e-2], variant=["lora", "droplora"], rank=[4, 8]))
    with Store(db) as s:  # results as the runner would record them, without the processes
        s.save_study("t", {})
        s.add_trials("t", trials)
        for cfg in trials:
            task, spec, kwargs = call_args(cfg)
            kwargs["sleep"] = 0
            s.finish("t", trial_id(cfg), {"status": "done", "result": study_fake.trial(task, spec, **kwargs),
                                          "wall_seconds": 1.0, "peak_rss_mb": 200.0})
    assert cli.main(["report", str(db), "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "rep" / "report.md").read_text() in text
    for png in ("metric_vs_lr_toy.png", "loss_toy.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    assert "### Best learning rate and accuracy per variant" in text
    assert "| lora rank=8 | 0.001 | 0.9080 |" in text  # best lr of the synthetic curve
    assert "Loss AUC" in text and "split by rank" in text
    import csv

    rows = list(csv.DictReader(open(tmp_path / "rep" / "trials.csv")))
    assert len(rows) == len(trials) and {r["status"] for r in rows} == {"done"}
    best = next(r for r in rows if r["variant"] == "lora" and '"rank": 8' in r["config"] and float(r["lr"]) == 1e-3)
    assert float(best["metric"]) == pytest.approx(0.908, abs=5e-5)


def test_report_refuses_a_missing_or_empty_study(tmp_path):
    with pytest.raises(StudyError, match="no study file"):
        report(str(tmp_path / "none.sqlite"))
    with Store(tmp_path / "e.sqlite") as s:
        s.save_study("e", {})
    with pytest.raises(StudyError, match="no finished trial"):
        report(str(tmp_path / "e.sqlite"))


def test_suites_are_valid_study_configs():
    import lorazoo

    quick = expand(suite("quick"))
    nlu = [t for t in quick if t["task"] == "sentiment"]
    lrs = sorted({t["lr"] for t in nlu})
    assert len(lrs) >= 5 and lrs[0] == 1e-5 and lrs[-1] == 1e-2
    quick_variants = {t["variant"] for t in nlu}  # the 20 of the checked-in study, all still presets
    assert len(quick_variants) == 20 and quick_variants <= set(lorazoo.variants()) and {t["seed"] for t in nlu} == {0}
    assert {t["task"] for t in quick} >= {"sentiment", "nlg_sentiment", "fashion"}
    for name in SUITES:
        validate(suite(name), known_tasks=["sentiment", "bbc", "nlg_sentiment", "fashion"])
    with pytest.raises(StudyError, match="unknown suite 'nope'; suites: "):
        suite("nope")


def test_report_splits_lines_only_by_axes_that_vary_within_a_task():
    from lorazoo.study.report import summarize

    def t(task, limit):
        return {"status": "done", "config": {"task": task, "variant": "lora", "lr": 1e-3, "seed": 0, "limit": limit}}

    s = summarize([t("a", 512), t("b", 256), t("b", 128)])
    assert s["extra_axes"] == {"a": [], "b": ["limit"]}
    assert set(s["tasks"]["a"]) == {"lora"} and set(s["tasks"]["b"]) == {"lora limit=256", "lora limit=128"}


# --- a trial killed mid-way resumes from its checkpoint ------------------------------------------
def _tiny_study(name):
    return {"name": name, "trial_fn": "study_fake:tiny_run",
            "grid": {"task": ["tiny_ckpt"], "variant": ["lora"], "lr": [0.02], "seed": [0]},
            "fixed": {"rank": 4, "epochs": 2, "batch_size": 16}}


def test_a_trial_killed_midway_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from lorazoo.study.runner import trial_dir

    log = tmp_path / "calls.log"
    monkeypatch.setenv("STUDY_FAKE_LOG", str(log))
    known = ["tiny_ckpt"]
    ref = run_study(tmp_path / "ref.sqlite", _tiny_study("ref"), checkpoint_every=0, known_tasks=known, log=quiet)
    assert ref["done"] == 1
    monkeypatch.setenv("STUDY_KILL_AT", "5")
    db = tmp_path / "s.sqlite"
    first = run_study(db, _tiny_study("s"), checkpoint_every=2, known_tasks=known, log=quiet)
    assert first["failed"] == 1  # killed by SIGKILL after its step-6 checkpoint
    with Store(db) as s:
        tid = s.trials("s")[0]["id"]
    folder = trial_dir(db, tid)
    assert (folder / "checkpoints" / "step-00000006").is_dir()
    second = run_study(db, _tiny_study("s"), checkpoint_every=2, known_tasks=known, log=quiet)
    assert second["done"] == 1
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["from"] for c in calls] == [None, None, "step-00000006"]  # ref, killed, resumed
    assert calls[0]["out_dir"] is None and calls[2]["out_dir"] == str(folder)
    assert not folder.exists()  # removed once the trial is done
    with Store(tmp_path / "ref.sqlite") as s:
        want = s.trials("ref")[0]["result"]
    with Store(db) as s:
        got = s.trials("s")[0]["result"]
    assert got["steps"] == want["steps"] == 12
    for a, b in zip(got["losses"], want["losses"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(got["metrics_per_epoch"][-1]["loss"], want["metrics_per_epoch"][-1]["loss"], rel_tol=1e-5)


def test_trial_functions_without_checkpoint_arguments_run_as_before(tmp_path):
    from lorazoo.study.trial import resume_options
    from study_fake import tiny_run, trial

    payload = {"trial_dir": str(tmp_path / "t"), "checkpoint_every": 3}
    assert resume_options(trial, {}, payload) == {}  # the fake takes no out_dir
    assert resume_options(tiny_run, {}, payload) == {"out_dir": str(tmp_path / "t"), "checkpoint_every": 3,
                                                     "resume": True}
    assert resume_options(tiny_run, {"out_dir": "mine"}, payload) == {}  # the trial's own choice wins
    assert resume_options(tiny_run, {}, {}) == {}
    with pytest.raises(StudyError, match="checkpoint_every must be"):
        run_study(tmp_path / "x.sqlite", config(), checkpoint_every=-1, log=quiet)


def test_the_base_is_evaluated_once_per_seed_and_handed_to_later_trials(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv("STUDY_FAKE_LOG", str(log))
    study = {"name": "b", "trial_fn": "study_fake:tiny_run",
             "grid": {"task": ["tiny_ckpt"], "variant": ["lora", "nzlora", "dora"], "lr": [0.02], "seed": [0, 1]},
             "fixed": {"rank": 4, "epochs": 0.5, "batch_size": 16}}
    assert run_study(tmp_path / "b.sqlite", study, checkpoint_every=0, known_tasks=["tiny_ckpt"], log=quiet)["done"] == 6
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["given_before"] for c in calls].count(False) == 2  # the first trial of each seed (its key) measures
    with Store(tmp_path / "b.sqlite") as s:
        rows = s.trials("b")
    by_seed = {}
    for t in rows:
        res = t["result"]
        assert res["before_is_base"] == (t["config"]["variant"] != "nzlora")  # NZLoRA starts off the base
        by_seed.setdefault(t["config"]["seed"], []).append(res)
    for results in by_seed.values():
        base = [r["metrics_before"] for r in results if r["before_is_base"]]
        assert len(base) == 2 and all(b == base[0] for b in base)
        own = [r["metrics_before"]["loss"] for r in results if not r["before_is_base"]]
        assert len(own) == 1 and all(abs(x - base[0]["loss"]) > 1e-6 for x in own)  # measured, not handed


def test_run_uses_given_base_metrics_only_for_adapters_that_start_as_the_base(monkeypatch):
    from tiny import TinyTask

    import lorazoo
    from lorazoo.run import run
    from lorazoo.tasks.base import TASKS

    monkeypatch.setitem(TASKS, TinyTask.name, TinyTask)
    kw = dict(lr=0.02, epochs=0.25, batch_size=16, progress=False)
    measured = run("tiny_ckpt", lorazoo.AdapterSpec(form="lora", rank=4), **kw)["metrics_before"]
    given = {k: v + 1.0 for k, v in measured.items()}
    got = run("tiny_ckpt", lorazoo.AdapterSpec(form="lora", rank=4), metrics_before=given, **kw)
    assert got["metrics_before"] == given and got["before_is_base"]
    nz = run("tiny_ckpt", lorazoo.AdapterSpec.preset("nzlora", rank=4), metrics_before=given, **kw)
    assert nz["metrics_before"] != given and not nz["before_is_base"]
    plain = run("tiny_ckpt", lorazoo.AdapterSpec(form="lorma", rank=4), metrics_before=given, **kw)
    assert plain["metrics_before"] != given and not plain["before_is_base"]  # its form starts off the base
