"""The lorazoo CLI: argument validation (fast) and the default job on a slice of real data (slow)."""
import json

import pytest

from lorazoo.cli import main


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "nosuchtask"], "unknown task 'nosuchtask'; known tasks: "),
    (["train", "--variant", "nosuchvariant"], "unknown variant 'nosuchvariant'; known variants:"),
    (["train", "--form", "nosuchform"], "unknown form 'nosuchform'"),
    (["train", "--option", "nosuchoption=3"], "unknown option(s) nosuchoption"),
    (["train", "--option", "novalue"], "--option takes KEY=VALUE"),
    (["train", "--rank", "0"], "rank must be >= 1"),
    (["train", "--task-option", "nosuchoption=1"], "unknown option(s) nosuchoption for task 'sentiment'"),
    (["train", "--limit", "-5"], "--limit must be >= 0"),
    (["train", "--lr", "0"], "lr must be > 0"),
    (["train", "--epochs", "-1"], "epochs must be > 0"),
    (["eval", "/nonexistent/folder"], "holds no task.json"),
    (["export", "/nonexistent/folder", "out"], "holds no task.json"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and certainly not into the repo
    assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorazoo: error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["train", "--rank", "eight"], ["train", "--lr-schedule", "step"],
                                  ["train", "--nosuchflag"], ["eval"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_train_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--variant", "--form", "--init", "--scale", "--optim", "--schedule", "--rank",
                 "--alpha", "--rank-dropout", "--lr", "--epochs", "--batch-size", "--limit", "--seed",
                 "--out", "--option", "--no-progress"):
        assert flag in out


def test_option_values_are_read_as_json():
    from lorazoo.commands.train import parse_options

    assert parse_options(["a=16", "b=0.5", "c=true", "d=text", "e=[1,2]"], "--option") == {
        "a": 16, "b": 0.5, "c": True, "d": "text", "e": [1, 2]}


@pytest.mark.slow
def test_default_job_on_a_slice_improves_accuracy_and_eval_reproduces_it(tmp_path, capsys):
    out = tmp_path / "run"
    # the default job (LoRA r=8, its lr, schedule and batch size), on 640 texts and a 400-text test split
    rc = main(["train", "--limit", "640", "--task-option", "test_size=400", "--no-progress", "--json",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    result = json.loads(text[text.index("{"):])
    assert result["spec"]["form"] == "lora" and result["spec"]["rank"] == 8
    assert result["spec"]["modules_to_save"] == ["classifier"]
    assert result["metric_name"] == "accuracy"
    assert result["metric"] >= result["metric_before"] + 0.08, result
    assert len(result["losses"]) == result["steps"] == 40
    assert {"adapter.safetensors", "adapter_config.json", "task.json", "result.json"} <= {
        p.name for p in out.iterdir()}

    assert main(["eval", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metric"] == pytest.approx(result["metric"], abs=1e-9)
