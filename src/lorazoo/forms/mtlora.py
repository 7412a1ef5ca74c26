"""MTLoRA (Agiza et al., CVPR 2024 [95]; the taxonomy's MoE "MiLoRA" entry): a task-agnostic LoRA
shared by all tasks plus one task-specific LoRA per task, the task choosing its module.

Followed the authors' code (scale-lab/MTLoRA, models/lora.py, ``MTLoRALinear``): a shared pair
(A_sh, B_sh) and, per task t, (A_t, B_t), all A Kaiming-uniform and all B zero (starts as the base).
In the paper's multi-task Swin, a layer outputs the shared stream W0 x + s·B_sh A_sh x to the
next block and, at the end of each stage, one stream per task for that task's decoder. Here a
layer has one output, so a sample's task picks its stream:

* a sample with task label t: y = W0 x + s·B_sh A_sh x + s·B_t A_t x (the code's ``matrixv2``
  composition, shared and task-specific updates together);
* no task labels: the shared stream y = W0 x + s·B_sh A_sh x (what every non-final block of the
  paper's backbone computes), so the form trains and runs without labels as plain LoRA of rank
  r_sh, and the task modules only train on labelled data.

Labels come with the data like MoA's (lorazoo.routing.set_labels): :func:`set_tasks`, the
:func:`tasks` context, or :func:`read_tasks_from_batches` (a ``"tasks"`` batch key). Not covered:
the per-task output streams themselves (several outputs from one layer) and the task decoders;
the code's other modes ('matrix' without the shared term, 'addition' with a LayerNorm); its
trainable per-task scales (``trainable_scale_per_task``); we use the scale part's s = alpha/r for
every module (the code multiplies by a fixed ``lora_*_scale`` instead).

The shared and task modules are stored concatenated, A ((1+T)·r, in), B (out, (1+T)·r), with
gates [1, onehot(t)] applied by lorazoo.routing.gate_experts: LoRA's two matmuls over (1+T)·r
units, no loop over tasks (without labels only the shared module's r units run, LoRA's cost).
``rank`` is each module's rank r (the code's ``r['shared']`` and
``r[task]``, equal in its configs). Not mergeable (the update depends on the sample's task).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..parts import Form, check_number
from ..registry import FORMS
from ..routing import checked_labels, gate_experts, labels_context, read_labels_from_batches, set_labels


@FORMS.register("mtlora", paper="MTLoRA (Agiza et al., 2024) [95]",
                equations="y = W0 x + s·B_sh A_sh x + s·B_t A_t x for a sample of task t (shared stream "
                          "without labels)",
                summary="task-agnostic LoRA shared by all tasks plus a task-specific LoRA per task")
class MTLoRA(Form):
    """Shared and task-specific LoRA modules side by side; the sample's task gates its module."""

    mergeable = False
    rank_bound = "2r per sample (shared + its task's)"
    options = {"mtlora_tasks": 4}
    label_kind = "task"

    @classmethod
    def validate(cls, opts):
        check_number("mtlora_tasks", opts["mtlora_tasks"], minimum=1, integer=True, maximum=256)

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.tasks = int(opts["mtlora_tasks"])
        self.module_rank = int(rank)
        self.rank = (1 + self.tasks) * self.module_rank  # the rank mask spans every module's units
        self.A = nn.Parameter(torch.empty(self.rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, self.rank))
        self.sample_labels: torch.Tensor | None = None
        self.reset_parameters()

    @property
    def label_classes(self) -> int:
        return self.tasks

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def module(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_i, A_i): module 0 is the shared one, module 1 + t task t's."""
        cols = slice(i * self.module_rank, (i + 1) * self.module_rank)
        return self.B[:, cols], self.A[cols]

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(samples, 1 + T): 1 on the shared module and on the sample's task module."""
        n = x.shape[:-2].numel() if x.dim() >= 3 else x.shape[0]
        labels = checked_labels(self, n, x.device)
        g = torch.zeros(n, 1 + self.tasks, dtype=x.dtype, device=x.device)
        g[:, 0] = 1
        if labels is not None:
            g[torch.arange(n, device=x.device), 1 + labels] = 1
        return g.reshape(*x.shape[:-2], 1, 1 + self.tasks) if x.dim() >= 3 else g

    def forward(self, x, y, weight, mask=None):
        if self.sample_labels is None:  # the shared stream: only the shared module's r units run
            r = self.module_rank
            m = None if mask is None else mask[:r]
            return y + F.linear(self.rank_masked(F.linear(x, self.A[:r]), m) * self.scale, self.B[:, :r])
        h = gate_experts(self.rank_masked(F.linear(x, self.A), mask), self.gates(x))
        return y + F.linear(h * self.scale, self.B)


def set_tasks(handle, labels) -> None:
    """Task labels (ints in 0 .. mtlora_tasks-1, one per sample) of the next forwards; None: shared stream."""
    set_labels(handle, MTLoRA, labels)


def tasks(handle, labels):
    """``with tasks(handle, labels): model(...)``: the labels hold inside the block only."""
    return labels_context(handle, MTLoRA, labels)


def read_tasks_from_batches(handle, key: str = "tasks"):
    """Make ``model(**batch)`` take the task labels from ``batch[key]`` (removed before the model sees
    the batch); a batch without the key runs the shared stream."""
    return read_labels_from_batches(handle, MTLoRA, key)
