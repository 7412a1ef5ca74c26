"""The Task interface and its registry.

A task knows its model, its data and its metric::

    task = get_task("sentiment", limit=2000, seed=0, max_length=64)
    model = task.build_model()                  # base model with a fresh head
    task.train_batches(batch_size=16, epoch=0)  # list of dicts for model(**batch), with labels
    task.calibration_batches()                  # a few training batches for data-driven inits
    task.evaluate(model)                        # {"accuracy": ..., "loss": ...}; task.metric is primary

``limit`` sizes the training split only; the held-out test split is fixed by the task's
``split_seed`` option and does not depend on ``limit`` or on the training ``seed``.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

import torch
from torch import nn

from ..errors import LorazooError
from ..parts import check_number
from ._util import seeded_split

TASKS: dict[str, type["Task"]] = {}


class Task:
    """Base class. Subclasses set the class attributes and implement the four methods."""

    name: str = ""
    description: str = ""
    metric: str = "accuracy"          # the primary metric; higher is better
    targets: Any = "all-linear"       # default adapter targets
    modules_to_save: tuple = ()       # fresh heads, trained and saved with the adapter
    options: dict[str, Any] = {}      # option -> default (ints and floats are checked >= 0)
    run_defaults: dict[str, Any] = {}  # what `lorazoo train` uses for unset lr/epochs/batch_size/limit
    default_limit: int | None = None  # training examples when limit is None (None: all)

    def __init__(self, *, limit: int | None = None, seed: int = 0, **options: Any):
        if limit is not None:
            check_number("limit", limit, minimum=1, integer=True)
            limit = int(limit)
        check_number("seed", seed, integer=True)
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise LorazooError(
                f"unknown option(s) {', '.join(unknown)} for task {self.name!r}; "
                f"it accepts: {', '.join(sorted(self.options)) or 'none'}")
        self.limit, self.seed = limit, int(seed)
        self.opts = {**self.options, **options}
        for key, default in self.options.items():
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                check_number(key, self.opts[key], integer=isinstance(default, int))
        self.validate()

    def validate(self) -> None:
        """Refine option checks (raise LorazooError)."""

    # --- to implement -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The base model with a fresh head (its init follows the global torch seed)."""
        raise NotImplementedError

    def train_batches(self, batch_size: int, epoch: int = 0) -> list[dict]:
        """The training split as batches for ``model(**batch)``, shuffled by (seed, epoch)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict:
        """Metrics on the held-out test split; must include ``self.metric``."""
        raise NotImplementedError

    def processor(self):
        """What turns raw inputs into the model's (a tokenizer with ``save_pretrained``), saved beside an
        exported model (``lorazoo export``); None when the task has none to save."""
        return None

    # --- shared -------------------------------------------------------------------------------
    def n_examples(self) -> int:
        """How many labelled examples the data has (tasks that use the shared seeded split)."""
        raise NotImplementedError

    @functools.cached_property
    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        return seeded_split(self.n_examples(), int(self.opts["test_size"]), int(self.opts["split_seed"]),
                            self.limit or self.default_limit)

    @property
    def train_indices(self) -> torch.Tensor:
        """Training examples: the first ``limit`` of the non-test part of the ``split_seed`` permutation."""
        return self._split[0]

    @property
    def test_indices(self) -> torch.Tensor:
        """The held-out test split, fixed by the options ``test_size`` and ``split_seed``."""
        return self._split[1]

    def calibration_batches(self, n_batches: int = 8, batch_size: int = 16) -> list[dict]:
        """A few training batches for data-driven inits (``adapt(..., calibration=...)``)."""
        return self.train_batches(batch_size, epoch=0)[:n_batches]

    def config(self) -> dict:
        """What rebuilds this task: ``get_task(**config)`` (stored as task.json beside an adapter)."""
        return {"task": self.name, "limit": self.limit, "seed": self.seed, "options": dict(self.opts)}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its ``name``."""
    if not cls.name or cls.name in TASKS:
        raise RuntimeError(f"task name {cls.name!r} is empty or registered twice")
    TASKS[cls.name] = cls
    return cls


def _load_tasks() -> None:
    from .. import tasks

    for mod in pkgutil.iter_modules(tasks.__path__):
        if mod.name != "base":
            importlib.import_module(f"lorazoo.tasks.{mod.name}")


def task_names() -> list[str]:
    """Names of the registered tasks."""
    _load_tasks()
    return sorted(TASKS)


def task_class(name: str) -> type[Task]:
    """The Task class registered as ``name``; LorazooError naming the known tasks otherwise."""
    _load_tasks()
    if not isinstance(name, str) or name not in TASKS:
        raise LorazooError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS)) or 'none'}")
    return TASKS[name]


def get_task(task: str, *, limit: int | None = None, seed: int = 0, options: dict | None = None,
             **more_options: Any) -> Task:
    """Build task ``task`` with its options (either as ``options=`` or as keywords)."""
    return task_class(task)(limit=limit, seed=seed, **{**(options or {}), **more_options})
