"""`lorazoo train --config run.yaml`: every flag from a YAML file, command-line flags override it, unknown
keys refused, the resolved config written into the output folder (and running it again gives the same run)."""
import json

import pytest
import yaml

from lorazoo.cli import build_parser, main
from own_models import rows, tiny_bert, write


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    return {"model": tiny_bert(root / "bert"), "data": write(rows(48), root / "train.csv"), "root": root}


def config_file(path, **settings):
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def full_config(setup, out):
    """Every kind of setting: model, data, variant and parts, part options, optimizer, schedule, output."""
    return {"model": str(setup["model"]), "data": str(setup["data"]), "text_column": "text", "label_column": "label",
            "eval_split": 0.25, "max_length": 16, "variant": "lora", "form": "lora", "scale": "rslora",
            "optim": "loraplus", "rank": 4, "alpha": 8, "rank_dropout": 0.1, "targets": ["query", "value", "dense"],
            "option": {"loraplus_ratio": 4}, "lr": "2e-2", "epochs": 2, "batch_size": 8, "accumulation": 2,
            "lr_schedule": "cosine", "warmup": 0.2, "weight_decay": 0.01, "seed": 3, "out": str(out),
            "no_progress": True}


def result_of(out):
    return json.loads((out / "result.json").read_text())


def test_a_config_file_gives_the_same_run_as_the_flags_and_the_written_config_reruns_it(setup, tmp_path, capsys):
    cfg = config_file(tmp_path / "run.yaml", **full_config(setup, tmp_path / "a"))
    assert main(["train", "--config", str(cfg)]) == 0
    flags = ["train", "--model", str(setup["model"]), "--data", str(setup["data"]), "--text-column", "text",
             "--label-column", "label", "--eval-split", "0.25", "--max-length", "16", "--variant", "lora",
             "--form", "lora", "--scale", "rslora", "--optim", "loraplus", "--rank", "4", "--alpha", "8",
             "--rank-dropout", "0.1", "--targets", "query,value,dense", "--option", "loraplus_ratio=4",
             "--lr", "0.02", "--epochs", "2", "--batch-size", "8", "--accumulation", "2", "--lr-schedule", "cosine",
             "--warmup", "0.2", "--weight-decay", "0.01", "--seed", "3", "--out", str(tmp_path / "b"), "--no-progress"]
    assert main(flags) == 0
    a, b = result_of(tmp_path / "a"), result_of(tmp_path / "b")
    assert a["spec"] == b["spec"] and a["losses"] == b["losses"] and a["metric"] == b["metric"]
    assert a["spec"]["scale"] == "rslora" and a["spec"]["loraplus_ratio"] == 4
    assert a["lr"] == 0.02 and a["trainer"]["lr_schedule"] == "cosine" and a["trainer"]["accumulation"] == 2
    assert a["steps"] == 2 * 3 and a["seed"] == 3  # 36 training rows: 5 batches of 8, 3 steps of 2 an epoch

    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert written["model"] == str(setup["model"]) and written["lr"] == 0.02 and written["option"] == {
        "loraplus_ratio": 4}
    assert written["task_type"] == "classification" and written["targets"] == ["query", "value", "dense"]
    assert "no_progress" not in written and "config" not in written
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    c = result_of(tmp_path / "c")
    assert c["spec"] == a["spec"] and c["losses"] == a["losses"] and c["task_config"] == a["task_config"]


def test_command_line_flags_override_the_config_file(setup, tmp_path, capsys):
    cfg = config_file(tmp_path / "run.yaml", model=str(setup["model"]), data=str(setup["data"]), rank=4, epochs=0.5,
                      lr=0.01, optim="loraplus", option={"loraplus_ratio": 4}, out=str(tmp_path / "cfg"),
                      no_progress=True)
    assert main(["train", "--config", str(cfg), "--rank", "2", "--option", "loraplus_ratio=8", "--out",
                 str(tmp_path / "cli")]) == 0
    got = result_of(tmp_path / "cli")
    assert got["spec"]["rank"] == 2 and got["spec"]["loraplus_ratio"] == 8 and got["lr"] == 0.01
    assert not (tmp_path / "cfg").exists()
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["rank"] == 2


def test_config_keys_may_use_dashes_and_option_lists(setup, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {setup['model']}\ndata: {setup['data']}\nbatch-size: 16\nepochs: 1\nlr: 1e-2\n"
                   f"option: [loraplus_ratio=2]\noptim: loraplus\nno-progress: true\nout: {tmp_path / 'o'}\n")
    assert main(["train", "--config", str(cfg)]) == 0
    got = result_of(tmp_path / "o")
    assert got["batch_size"] == 16 and got["lr"] == 0.01 and got["spec"]["loraplus_ratio"] == 2


def _refused(argv, message, capsys):
    assert main(["train", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorazoo: error: ") and message in err, err
    return err


def test_unknown_keys_are_refused_with_the_list_of_known_ones(setup, tmp_path, capsys):
    cfg = config_file(tmp_path / "run.yaml", model=str(setup["model"]), learning_rate=0.1, out=str(tmp_path / "o"))
    err = _refused(["--config", str(cfg)], "unknown key(s) learning_rate; known keys: ", capsys)
    known = err.split("known keys: ")[1]
    for key in ("model", "data", "eval_data", "text_column", "variant", "form", "rank", "option", "lr", "lr_schedule",
                "warmup", "batch_size", "epochs", "out", "checkpoint_every", "task_option"):
        assert key in known.replace(",", " ").split(), key
    assert "resume" not in known.split(", ") and "config" not in known.split(", ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("settings, message", [
    ({"rank": "eight"}, "key rank: must be an integer, got 'eight'"),
    ({"rank": 2.5}, "key rank: must be an integer"),
    ({"lr": True}, "key lr: must be a number"),
    ({"lr_schedule": "step"}, "key lr_schedule: 'step' is not one of linear, cosine, constant"),
    ({"no_progress": "yes"}, "key no_progress: must be true or false"),
    ({"option": 3}, "key option: must be a mapping"),
    ({"variant": ["lora"]}, "key variant: must be a string"),
    ({"resume": "runs/x"}, "unknown key(s) resume"),
    ({"epochs": -1}, "epochs must be > 0"),
    ({"variant": "nosuchvariant"}, "unknown variant 'nosuchvariant'"),
])
def test_bad_values_are_refused_before_training(setup, tmp_path, capsys, settings, message):
    cfg = config_file(tmp_path / "run.yaml", model=str(setup["model"]), data=str(setup["data"]),
                      out=str(tmp_path / "o"), **settings)
    _refused(["--config", str(cfg)], message, capsys)
    assert not (tmp_path / "o").exists()


def test_unreadable_config_files_are_refused(tmp_path, capsys):
    _refused(["--config", str(tmp_path / "none.yaml")], "does not exist", capsys)
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    _refused(["--config", str(tmp_path / "bad.yaml")], "is not valid YAML", capsys)
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    _refused(["--config", str(tmp_path / "list.yaml")], "must be a mapping of flag names to values", capsys)


def test_resume_takes_no_config(tmp_path, capsys):
    _refused(["--resume", str(tmp_path), "--config", str(tmp_path / "x.yaml")], "drop --config", capsys)


def test_a_config_for_a_built_in_task_writes_no_own_data_keys(tmp_path, capsys, monkeypatch):
    """Built-in tasks read the config too; the written config names their task and no model/data."""
    from lorazoo.commands import train as train_cmd

    captured = {}

    def fake_run(task, spec, **kw):
        captured.update(task=task, spec=spec, **kw)
        raise SystemExit(0)
    monkeypatch.setattr("lorazoo.run.run", fake_run)
    cfg = config_file(tmp_path / "run.yaml", task="sentiment", variant="dora", lr=0.001, limit=64,
                      task_option={"test_size": 32}, out=str(tmp_path / "o"), no_progress=True)
    with pytest.raises(SystemExit):
        main(["train", "--config", str(cfg)])
    assert captured["task"] == "sentiment" and captured["spec"].form == "dora" and captured["limit"] == 64
    assert captured["test_size"] == 32 and captured["lr"] == 0.001
    written = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert written["task"] == "sentiment" and written["task_option"] == {"test_size": 32}
    assert not set(written) & set(train_cmd.OWN_DATA_FLAGS)


def test_every_train_flag_is_a_known_config_key():
    parser = build_parser()
    train = next(a for a in parser._subparsers._actions if a.choices and "train" in a.choices).choices["train"]
    flags = {a.dest for a in train._actions if a.option_strings and a.dest != "help"}
    from lorazoo.commands.train import NOT_IN_CONFIG, _actions

    assert set(_actions(train)) == flags and {"config", "resume"} == set(NOT_IN_CONFIG)
