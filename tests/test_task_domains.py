"""The bbc, fashion and nlg_sentiment tasks: fast split and metric checks, and (slow) one tiny real
trial each through lorazoo.run.run."""
import pytest
import torch

import lorazoo
from lorazoo.errors import LorazooError
from lorazoo.run import evaluate_saved, run
from lorazoo.tasks._util import macro_f1, seeded_split
from lorazoo.tasks.base import get_task, task_names


def test_the_three_tasks_are_registered():
    assert {"bbc", "fashion", "nlg_sentiment"} <= set(task_names())
    with pytest.raises(LorazooError, match="unknown option.*bogus"):
        get_task("fashion", bogus=1)
    with pytest.raises(LorazooError, match="image_size"):
        get_task("fashion", image_size=8)


def test_seeded_split_is_fixed_and_limit_takes_a_prefix():
    a_train, a_test = seeded_split(100, 10, 0, None)
    b_train, b_test = seeded_split(100, 10, 0, 20)
    assert torch.equal(a_test, b_test) and torch.equal(a_train[:20], b_train)
    assert not set(a_train.tolist()) & set(a_test.tolist()) and len(a_train) == 90
    assert not torch.equal(seeded_split(100, 10, 1, None)[1], a_test)


def test_bbc_split():
    a, b = get_task("bbc", limit=50), get_task("bbc", seed=3)
    assert len(a.test_indices) == 445 and torch.equal(a.test_indices, b.test_indices)
    assert len(b.train_indices) == 2225 - 445 and torch.equal(a.train_indices, b.train_indices[:50])
    assert not torch.equal(get_task("bbc", split_seed=1).test_indices, a.test_indices)


def test_fashion_split():
    a, b = get_task("fashion", limit=100), get_task("fashion", seed=2)
    assert len(b.train_indices) == 3000 and torch.equal(a.train_indices, b.train_indices[:100])
    assert len(a.test_indices) == 1000 and torch.equal(a.test_indices, b.test_indices)
    batch = a.train_batches(16)[0]
    assert batch["pixel_values"].shape == (16, 3, 96, 96) and batch["labels"].shape == (16,)
    assert -1.0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1.0


def test_nlg_split_and_answer_scoring():
    from lorazoo.tasks.nlg import first_answer

    a, b = get_task("nlg_sentiment", limit=10), get_task("nlg_sentiment", seed=1)
    assert len(a.test_indices) == 200 and torch.equal(a.test_indices, b.test_indices)
    assert len(b.train_indices) == 640 and torch.equal(a.train_indices, b.train_indices[:10])
    assert first_answer("This movie review is positive.") == 1
    assert first_answer("Negative, not positive") == 0 and first_answer("I cannot tell") is None


def test_macro_f1():
    gold = torch.tensor([0, 0, 1, 1, 2])
    assert macro_f1(gold, gold, 3) == 1.0
    pred = torch.tensor([0, 1, 1, 1, 2])  # class 0: 2/3, class 1: 4/5, class 2: 1
    assert macro_f1(pred, gold, 3) == pytest.approx((2 / 3 + 0.8 + 1) / 3)


def _tiny_run(task, spec, **kw):
    res = run(task, spec, lr=1e-3, limit=4, batch_size=2, epochs=1, progress=False, **kw)
    assert res["steps"] == 2 and len(res["losses"]) == 2
    assert 0.0 <= res["metric_before"] <= 1.0 and 0.0 <= res["metric"] <= 1.0
    return res


@pytest.mark.slow
def test_bbc_trial():
    res = _tiny_run("bbc", lorazoo.AdapterSpec(rank=2, targets=["query", "value"]), test_size=8, max_length=32)
    assert set(res["metrics_before"]) == {"accuracy", "macro_f1", "loss"}


@pytest.mark.slow
def test_fashion_trial_and_saved_adapter_reloads(tmp_path):
    res = _tiny_run("fashion", lorazoo.AdapterSpec(rank=2, targets="all-conv"), test_size=6, image_size=32,
                    out_dir=tmp_path)
    again = evaluate_saved(tmp_path)
    assert again["metric"] == pytest.approx(res["metric"])
    assert again["metrics"]["loss"] == pytest.approx(res["metrics_per_epoch"][-1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_nlg_sentiment_trial():
    spec = lorazoo.AdapterSpec(rank=2, targets=["q_proj", "v_proj"])
    res = _tiny_run("nlg_sentiment", spec, test_size=4, eval_batch_size=4, max_new_tokens=2, max_length=16)
    assert set(res["metrics_before"]) == {"accuracy", "loss", "answered"}
