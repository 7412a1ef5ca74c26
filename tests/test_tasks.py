"""The task registry and the sentiment task's data splits (real data; no model is loaded)."""
import pytest
import torch

from lorazoo.errors import LorazooError
from lorazoo.tasks.base import get_task, task_names


def test_registry_knows_sentiment_and_names_the_known_tasks():
    assert "sentiment" in task_names()
    with pytest.raises(LorazooError, match="unknown task 'nope'; known tasks: .*sentiment"):
        get_task("nope")
    with pytest.raises(LorazooError, match="unknown option.*bogus.*accepts: .*max_length"):
        get_task("sentiment", bogus=1)
    with pytest.raises(LorazooError, match="limit"):
        get_task("sentiment", limit=0)


def test_test_split_is_fixed_and_independent_of_limit_and_seed():
    a = get_task("sentiment", limit=100, seed=0)
    b = get_task("sentiment", limit=3000, seed=5)
    assert len(a.test_indices) == 1000 and torch.equal(a.test_indices, b.test_indices)
    assert len(a.train_indices) == 100 and len(b.train_indices) == 3000
    assert torch.equal(a.train_indices, b.train_indices[:100])  # limit takes a prefix of one pool
    assert not set(b.train_indices.tolist()) & set(b.test_indices.tolist())
    other = get_task("sentiment", split_seed=1)
    assert not torch.equal(other.test_indices, a.test_indices)
    assert len(get_task("sentiment").train_indices) + 1000 == 12752


def test_batches_are_padded_per_batch_and_reshuffled_per_epoch():
    t = get_task("sentiment", limit=64, seed=0, max_length=16)
    e0, e1 = t.train_batches(16, 0), t.train_batches(16, 1)
    assert len(e0) == 4 and all(b["input_ids"].shape[0] == 16 for b in e0)
    assert all(b["input_ids"].shape[1] <= 16 for b in e0)
    assert all(torch.equal(b["attention_mask"].sum(1) > 0, torch.ones(16, dtype=torch.bool)) for b in e0)
    assert not torch.equal(e0[0]["labels"], e1[0]["labels"]) or not torch.equal(e0[0]["input_ids"], e1[0]["input_ids"])
    assert sorted(torch.cat([b["labels"] for b in e0]).tolist()) == sorted(torch.cat([b["labels"] for b in e1]).tolist())
    assert torch.equal(t.train_batches(16, 0)[0]["input_ids"], e0[0]["input_ids"])  # seeded
    assert len(t.calibration_batches(n_batches=2, batch_size=8)) == 2
    assert t.config() == {"task": "sentiment", "limit": 64, "seed": 0,
                          "options": {"max_length": 16, "test_size": 1000, "split_seed": 0, "eval_batch_size": 128}}
