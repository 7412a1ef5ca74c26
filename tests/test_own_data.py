"""Your own model and data: `lorazoo train --model DIR --data FILE` and `lorazoo eval OUT --data FILE`
(the ``own`` task, lorazoo/tasks/own_data.py), on tiny random Hugging Face models (tests/own_models.py)."""
import json
import shutil

import pytest
import torch

import lorazoo
from lorazoo.cli import main
from lorazoo.errors import LorazooError
from lorazoo.tasks.base import get_task
from lorazoo.tasks.own_data import read_table
from own_models import ANSWERS, rows, tiny_bert, tiny_llama, tiny_tokenizer, write

FAST = ["--no-progress", "--rank", "4", "--lr", "0.02", "--batch-size", "8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"bert": tiny_bert(root / "bert"), "llama": tiny_llama(root / "llama")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": write(rows(96, seed=0), root / "train.csv"), "eval": write(rows(32, seed=1), root / "eval.csv"),
            "root": root}


def train(argv, capsys) -> dict:
    assert main(["train", *argv, "--json"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    return json.loads(text[text.index("{"):])


# --- reading data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl", "d.parquet", "d_saved"])
def test_every_format_reads_to_the_same_columns(tmp_path, name):
    table = rows(10, labels=(0, 1))
    got = read_table(write(table, tmp_path / name))
    assert got.to_dict() == {k: [r[k] for r in table] for k in table[0]}


def test_a_saved_dataset_dict_gives_its_train_split_as_data_and_test_split_as_eval(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(6)),
                               "test": datasets.Dataset.from_list(rows(4, seed=3))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(read_table(tmp_path / "dd")) == 6
    assert list(read_table(tmp_path / "dd", "eval data", ("test", "validation"))["text"]) == [
        r["text"] for r in rows(4, seed=3)]
    with pytest.raises(LorazooError, match="holds the splits train, test"):
        read_table(tmp_path / "dd", "data", ("validation",))


@pytest.mark.parametrize("name", ["data.parquet", "data_saved"])
def test_training_from_parquet_and_save_to_disk(models, tmp_path, capsys, name):
    path = write(rows(64), tmp_path / name)
    result = train(["--model", str(models["bert"]), "--data", str(path), "--epochs", "2", "--out", str(tmp_path / "o"),
                    *FAST], capsys)
    assert result["task"] == "own" and result["steps"] == 16  # 64 - 6 held out = 58 rows: 8 batches an epoch


# --- classification --------------------------------------------------------------------------------
def test_classifier_on_own_data_learns_saves_everything_and_eval_on_a_new_file_reproduces_it(
        models, data, tmp_path, capsys):
    out = tmp_path / "run"
    result = train(["--model", str(models["bert"]), "--data", str(data["train"]), "--eval-data", str(data["eval"]),
                    "--epochs", "4", "--out", str(out), *FAST], capsys)
    assert result["metric_name"] == "accuracy"
    assert result["metric_before"] <= 0.75 and result["metric"] >= 0.9, result
    assert result["steps"] == 4 * 96 // 8
    assert result["spec"]["modules_to_save"] == ["classifier"]
    assert {"adapter.safetensors", "adapter_config.json", "task.json", "result.json", "config.yaml", "metrics.json",
            "training.png"} <= {p.name for p in out.iterdir()}
    options = json.loads((out / "task.json").read_text())["options"]
    assert options["labels"] == ["neg", "pos"] and options["task_type"] == "classification"
    assert options["model"] == str(models["bert"]) and options["data"] == str(data["train"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == result["metric"] and len(metrics["losses"]) == result["steps"]
    assert metrics["metrics_after"] == result["metrics_per_epoch"][-1]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same rows in another format and another order score the same (no training data read)
    moved = write(list(reversed(rows(32, seed=1))), tmp_path / "again.jsonl")
    shutil.move(data["train"], data["root"] / "moved.csv")
    try:
        assert main(["eval", str(out), "--data", str(moved), "--json"]) == 0
    finally:
        shutil.move(data["root"] / "moved.csv", data["train"])
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"]["accuracy"] == pytest.approx(result["metric"], abs=1e-12)
    assert evaluated["metrics"]["loss"] == pytest.approx(result["metrics_per_epoch"][-1]["loss"], rel=1e-5)


def test_labels_map_to_the_head_in_sorted_order_and_num_labels_follows_the_data(models, tmp_path):
    table = rows(30, labels=(5, 1))
    for i, r in enumerate(table):
        r["label"] = (5, 1, 9)[i % 3]
    task = get_task("own", options={"model": str(models["bert"]), "data": str(write(table, tmp_path / "d.csv"))})
    assert task.opts["labels"] == [1, 5, 9]
    model = task.build_model()
    assert model.classifier.out_features == 3 and model.config.id2label == {0: "1", 1: "5", 2: "9"}
    batch = task.train_batches(64)[0]
    gold = {r["text"]: r["label"] for r in table}
    assert len(gold) == len(table)
    tok = tiny_tokenizer()
    for ids, y in zip(batch["input_ids"], batch["labels"]):
        text = tok.decode([i for i in ids.tolist() if i != 0])
        assert [1, 5, 9][int(y)] == gold[text]


def test_given_labels_fix_the_order_and_integral_floats_are_ints(models, tmp_path):
    table = [{"text": r["text"], "label": float(i % 2)} for i, r in enumerate(rows(20))]
    path = write(table, tmp_path / "d.jsonl")
    task = get_task("own", options={"model": str(models["bert"]), "data": str(path), "labels": [1, 0]})
    assert task.opts["labels"] == [1, 0] and task.label_ids == {1: 0, 0: 1}


def test_a_folder_with_a_trained_head_keeps_its_label_order_and_another_size_gets_a_fresh_head(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from own_models import _save

    path = write(rows(20), tmp_path / "d.csv")  # labels neg / pos
    for id2label, order, size in [({0: "pos", 1: "neg"}, ["pos", "neg"], 2),
                                  ({0: "neg", 1: "meh", 2: "pos"}, ["neg", "pos"], 2)]:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, id2label=id2label,
                         label2id={v: k for k, v in id2label.items()})
        head = BertForSequenceClassification(cfg)
        folder = _save(head, tmp_path / f"clf{len(id2label)}")
        task = get_task("own", options={"model": str(folder), "data": str(path)})
        assert task.opts["labels"] == order
        model = task.build_model()
        assert model.classifier.out_features == size
        if size == len(id2label):  # the trained head is kept, so its outputs mean what they meant
            torch.testing.assert_close(model.classifier.weight, head.classifier.weight, rtol=0, atol=0)


def test_texts_are_cut_to_the_models_positions(models, tmp_path):
    long = [{"text": " ".join(["good"] + ["the"] * 200), "label": "pos"}, {"text": "bad movie", "label": "neg"}] * 3
    task = get_task("own", options={"model": str(models["bert"]), "data": str(write(long, tmp_path / "l.csv")),
                                    "max_length": 512})
    batch = task.train_batches(6)[0]
    assert batch["input_ids"].shape[1] == 64  # the tiny BERT's max_position_embeddings
    assert task.build_model()(**batch).logits.shape == (5, 2)


def test_a_causal_lm_folder_can_be_trained_as_a_classifier_with_its_score_head(models, data, tmp_path, capsys):
    result = train(["--model", str(models["llama"]), "--task-type", "classification", "--data", str(data["train"]),
                    "--epochs", "1", "--out", str(tmp_path / "o"), *FAST], capsys)
    assert result["spec"]["modules_to_save"] == ["score"] and result["metric_name"] == "accuracy"
    assert main(["eval", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == pytest.approx(result["metric"], abs=1e-12)


def test_the_task_type_follows_the_architecture():
    from types import SimpleNamespace

    from lorazoo.tasks.own_data import infer_task_type

    for archs, gguf, kind in [(["LlamaForCausalLM"], False, "causal-lm"), (["GPT2LMHeadModel"], False, "causal-lm"),
                              (["BertModel"], False, "classification"),
                              (["RobertaForSequenceClassification"], False, "classification"),
                              (None, True, "causal-lm"), (None, False, "classification")]:
        assert infer_task_type(SimpleNamespace(architectures=archs), gguf=gguf) == kind, archs


# --- causal LM -------------------------------------------------------------------------------------
def test_prompt_response_batches_put_the_loss_on_the_response_tokens_only(models, data):
    task = get_task("own", options={"model": str(models["llama"]), "data": str(data["train"]),
                                    "prompt_column": "prompt", "response_column": "response"})
    assert task.opts["task_type"] == "causal-lm" and task.metric == "token_accuracy" and task.modules_to_save == ()
    tok = tiny_tokenizer()
    table = {r["text"] + " answer :": r["response"] for r in rows(96, seed=0)}
    for batch in task.train_batches(8)[:3]:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            scored = labels[labels != -100].tolist()
            prompt = tok.decode(ids[:n - len(scored)].tolist())
            assert scored == tok(table[prompt], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert labels[:n - len(scored)].eq(-100).all() and labels[n:].eq(-100).all()
            assert ids[n - len(scored):n].tolist() == scored


def test_text_only_language_modelling_scores_every_token_and_long_prompts_keep_the_response(models, tmp_path):
    path = write(rows(8), tmp_path / "d.csv")
    task = get_task("own", options={"model": str(models["llama"]), "data": str(path)})
    batch = task.train_batches(8)[0]
    assert torch.equal(batch["labels"] != -100, batch["attention_mask"].bool())
    long = [{"prompt": " ".join(["the"] * 40), "response": "yes"}] * 4
    task = get_task("own", options={"model": str(models["llama"]), "data": str(write(long, tmp_path / "l.csv")),
                                    "prompt_column": "prompt", "response_column": "response", "max_length": 16})
    batch = task.train_batches(4)[0]
    assert batch["input_ids"].shape[1] == 16
    assert batch["labels"][0, -2:].tolist() == [tiny_tokenizer().convert_tokens_to_ids("yes"), 2]


def test_causal_lm_fine_tuning_lowers_the_response_loss_and_evaluates_on_new_data(models, data, tmp_path, capsys):
    out = tmp_path / "lm"
    result = train(["--model", str(models["llama"]), "--data", str(data["train"]), "--prompt-column", "prompt",
                    "--response-column", "response", "--eval-split", "0.25", "--epochs", "3", "--out", str(out),
                    *FAST], capsys)
    before, after = result["metrics_before"], result["metrics_per_epoch"][-1]
    assert result["metric_name"] == "token_accuracy" and result["steps"] == 3 * 72 // 8
    assert after["loss"] < 0.5 * before["loss"] and after["token_accuracy"] >= 0.9, (before, after)
    assert after["perplexity"] == pytest.approx(torch.tensor(after["loss"]).exp().item(), rel=1e-6)
    assert main(["eval", str(out), "--data", str(data["eval"]), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["metrics"]
    assert evaluated["token_accuracy"] >= 0.9

    # exported merged: transformers alone (model + the run's tokenizer) computes the adapted model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorazoo.run import load_saved

    assert main(["export", str(out), str(tmp_path / "merged")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = tok(["a prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, load_saved(out)[1].eval()(ids).logits, rtol=1e-4, atol=1e-5)


class Killed(Exception):
    pass


def test_an_own_data_run_resumes_after_a_kill_like_an_uninterrupted_one(models, data, tmp_path, monkeypatch, capsys):
    from lorazoo.train import Trainer

    flags = ["train", "--model", str(models["bert"]), "--data", str(data["train"]), "--epochs", "2",
             "--checkpoint-every", "5", *FAST]
    assert main([*flags, "--out", str(tmp_path / "ref")]) == 0
    real = Trainer._step

    def dying(self, *a):
        if self.step == 12:
            raise Killed()
        return real(self, *a)
    monkeypatch.setattr(Trainer, "_step", dying)
    with pytest.raises(Killed):
        main([*flags, "--out", str(tmp_path / "run")])
    monkeypatch.setattr(Trainer, "_step", real)
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    ref, got = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("ref", "run"))
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5) and got["metric"] == ref["metric"]
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "training.png").is_file()
    capsys.readouterr()


# --- clear errors before any training --------------------------------------------------------------
def _expect_error(argv, message, capsys, tmp_path):
    out = tmp_path / "never"
    assert main(["train", *argv, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorazoo: error: ") and message in err, err
    assert not out.exists()


def test_a_missing_column_names_the_columns_found(models, data, capsys, tmp_path):
    _expect_error(["--model", str(models["bert"]), "--data", str(data["train"]), "--text-column", "review"],
                  "has no column 'review' (--text-column); its columns are: text, label, prompt, response",
                  capsys, tmp_path)
    _expect_error(["--model", str(models["llama"]), "--data", str(data["train"]), "--prompt-column", "q",
                   "--response-column", "response"], "has no column 'q'", capsys, tmp_path)
    _expect_error(["--model", str(models["bert"]), "--data", str(data["train"]), "--eval-data",
                   str(write([{"text": "good"}], tmp_path / "e.csv"))], "has no column 'label'", capsys, tmp_path)


@pytest.mark.parametrize("labels, message", [
    (["pos"] * 6, "holds a single label ('pos'); a classifier needs at least 2"),
    ([0.5, 1, 0, 1, 0, 1], "label 0.5 in row 0 (column 'label') is neither a string nor an integer"),
    (["pos", None, "neg", "pos", "neg", "pos"], "column 'label' has no value in 1 row(s), the first row 1"),
])
def test_labels_that_do_not_fit_are_refused(models, tmp_path, capsys, labels, message):
    table = [{"text": r["text"], "label": y} for r, y in zip(rows(6), labels)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in table))
    _expect_error(["--model", str(models["bert"]), "--data", str(path)], message, capsys, tmp_path)


def test_eval_labels_the_head_does_not_know_are_refused(models, data, tmp_path, capsys):
    extra = write(rows(6, labels=("neg", "meh")), tmp_path / "e.csv")
    _expect_error(["--model", str(models["bert"]), "--data", str(data["train"]), "--eval-data", str(extra)],
                  "label(s) 'meh' in column 'label' do not fit the head, whose labels are ['neg', 'pos']",
                  capsys, tmp_path)
    _expect_error(["--model", str(models["bert"]), "--data", str(data["train"]), "--task-option",
                   'labels=["neg"]'], "labels must be a list of at least 2", capsys, tmp_path)


def test_empty_and_unreadable_files_are_refused(models, tmp_path, capsys):
    bert = str(models["bert"])
    (tmp_path / "empty.csv").write_text("")
    _expect_error(["--model", bert, "--data", str(tmp_path / "empty.csv")], "is empty", capsys, tmp_path)
    (tmp_path / "header.csv").write_text("text,label\n")
    _expect_error(["--model", bert, "--data", str(tmp_path / "header.csv")],
                  "holds no rows", capsys, tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    _expect_error(["--model", bert, "--data", str(tmp_path / "empty.jsonl")], "holds no rows", capsys, tmp_path)
    (tmp_path / "d.txt").write_text("good movie\n")
    _expect_error(["--model", bert, "--data", str(tmp_path / "d.txt")],
                  "unknown file type '.txt'; lorazoo reads .csv, .json, .jsonl, .parquet", capsys, tmp_path)
    (tmp_path / "bad.parquet").write_text("not parquet")
    _expect_error(["--model", bert, "--data", str(tmp_path / "bad.parquet")], "cannot read data", capsys, tmp_path)
    (tmp_path / "folder").mkdir()
    _expect_error(["--model", bert, "--data", str(tmp_path / "folder")], "not one written by datasets' save_to_disk",
                  capsys, tmp_path)
    _expect_error(["--model", bert, "--data", str(tmp_path / "nothing.csv")], "does not exist", capsys, tmp_path)
    small = write(rows(1), tmp_path / "one.csv")
    _expect_error(["--model", str(models["llama"]), "--data", str(small)], "too few to hold out", capsys, tmp_path)


def test_model_folders_without_weights_config_or_tokenizer_are_refused(models, data, tmp_path, capsys):
    for drop, message in [("model.safetensors", "holds no weights"), ("config.json", "has no config.json"),
                          ("tokenizer.json", "cannot load a tokenizer")]:
        folder = tmp_path / drop
        shutil.copytree(models["bert"], folder)
        (folder / drop).unlink()
        _expect_error(["--model", str(folder), "--data", str(data["train"])], message, capsys, tmp_path)
    _expect_error(["--model", str(tmp_path / "none"), "--data", str(data["train"])],
                  "neither a Hugging Face model folder nor a .gguf file", capsys, tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--data", "x.csv"], "--data need --model DIR"),
    (["--task", "sentiment", "--model", "m"], "drop --task sentiment"),
    (["--task-type", "causal-lm", "--prompt-column", "prompt"], "give both --prompt-column and --response-column"),
    (["--prompt-column", "prompt", "--response-column", "response"], "are for causal-LM fine-tuning"),
    (["--eval-split", "1.5"], "eval_split must be a fraction in (0, 1)"),
])
def test_inconsistent_flags_are_refused(models, data, tmp_path, capsys, argv, message):
    base = [] if "--model" in argv or argv[0] == "--data" else ["--model", str(models["bert"]),
                                                               "--data", str(data["train"])]
    _expect_error([*base, *argv], message, capsys, tmp_path)


def test_eval_data_flag_is_for_own_data_runs_only(tmp_path, capsys, models, data):
    (tmp_path / "task.json").write_text(json.dumps({"task": "sentiment", "options": {}}))
    assert main(["eval", str(tmp_path), "--data", str(data["train"])]) == 2
    assert "holds a run on the built-in task 'sentiment'" in capsys.readouterr().err


def test_the_own_task_through_the_python_api(models, data, tmp_path):
    from lorazoo.run import evaluate_saved, run

    spec = lorazoo.AdapterSpec.preset("lora", rank=2)
    result = run("own", spec, lr=0.02, epochs=0.5, batch_size=16, model=str(models["llama"]), data=str(data["train"]),
                 text_column="text", out_dir=tmp_path, progress=False)
    assert result["metric_name"] == "token_accuracy"
    assert evaluate_saved(tmp_path)["metric"] == pytest.approx(result["metric"], abs=1e-12)
    assert ANSWERS  # the helper's answers are in the tokenizer's vocabulary


@pytest.mark.slow
def test_minilm_on_a_small_csv_end_to_end(tmp_path, capsys):
    """The real all-MiniLM-L6-v2 folder, a CSV of 240 texts, 2 epochs (24 steps, ~20 s of training on 2 cores):
    accuracy and loss improve; eval reproduces the result."""
    from lorazoo.tasks.text_classification import model_dir

    positive = ["a wonderful, moving film", "great acting and a clever plot", "I loved every minute of it",
                "funny, warm and beautifully shot", "the best movie of the year", "a delightful surprise"]
    negative = ["a dull, lifeless film", "terrible acting and a silly plot", "I hated every minute of it",
                "boring, cold and badly shot", "the worst movie of the year", "a tedious mess"]
    import random

    rng = random.Random(0)
    table = []
    for i in range(240):
        y = i % 2
        a, b = rng.sample(positive if y else negative, 2)
        table.append({"review": f"{a}; {b}.", "sentiment": "positive" if y else "negative"})
    path = write(table, tmp_path / "reviews.csv")
    out = tmp_path / "run"
    result = train(["--model", model_dir(), "--data", str(path), "--text-column", "review", "--label-column",
                    "sentiment", "--eval-split", "0.25", "--epochs", "2", "--batch-size", "16", "--lr", "2e-3",
                    "--max-length", "32", "--no-progress", "--out", str(out)], capsys)
    # the untuned MiniLM with a fresh head already scores ~0.78 on these phrases; the adapter takes it to ~1
    assert result["metric"] >= 0.95 and result["metric"] > result["metric_before"], result
    assert result["metrics_per_epoch"][-1]["loss"] < 0.5 * result["metrics_before"]["loss"], result
    assert json.loads((out / "task.json").read_text())["options"]["labels"] == ["negative", "positive"]
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == pytest.approx(result["metric"], abs=1e-9)
