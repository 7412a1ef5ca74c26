"""Helpers shared by the tasks: seeded splits, metrics, quiet Hugging Face loading, the cache folder."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..errors import LorazooError


def seeded_split(n: int, test_size: int, split_seed: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices of ``n`` examples: one permutation fixed by ``split_seed``; its first
    ``test_size`` are the test split, training takes the first ``limit`` of the rest (all if None).
    The test split depends only on ``n``, ``test_size`` and ``split_seed``."""
    if not 1 <= test_size < n:
        raise LorazooError(f"test_size must be in 1..{n - 1}, got {test_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed)))
    pool = perm[test_size:]
    return (pool if limit is None else pool[:limit]), perm[:test_size]


def shuffled(idx: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """``idx`` reshuffled by (seed, epoch), as the sentiment task does."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return idx[torch.randperm(len(idx), generator=g)]


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, n_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN); a class absent from both is skipped."""
    scores = []
    for c in range(n_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@contextlib.contextmanager
def quiet_transformers():
    """No "newly initialized" warnings or progress bars while loading a model."""
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def cache_dir(*parts: str) -> Path:
    """``$LORAZOO_CACHE`` (default ``~/.cache/lorazoo``) joined with ``parts``."""
    root = os.environ.get("LORAZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorazoo")
    return Path(root, *parts)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise LorazooError(f"batch_size must be >= 1, got {batch_size}")
