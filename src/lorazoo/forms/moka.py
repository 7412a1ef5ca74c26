"""MokA (Wei et al. 2025 [15]): multimodal low-rank adaptation, one A per modality, a text-to-other
cross-attention in the low-rank space, one shared B.

Followed the authors' code (GeWu-Lab/MokA, AudioVisualText/peft_hyper/tuners/lora.py, ``Linear``,
``loramethod='train'``): for a token of modality m, h = s·A_m x (s = alpha/r, applied before the
attention as the code does); for every non-text token (m != 0) of a sequence,

    h <- h + λ·softmax(h K^T / sqrt(N_q)) K,    K = the text rows h of the sequence's question tokens,

the keys spanning the first to the last question token (the code slices that span; non-question
tokens inside it are zero keys), N_q the number of question tokens, λ = ``moka_cross_weight`` (the
code's ``blc_weight``, 1 in its scripts); then y = W0 x + B h with one B for all modalities.
Modality 0 is text; ``moka_modalities`` counts them (3 in the audio-visual-text code; every A_m
has the rank r, its ``lora_r=444``). Init: every A_m Kaiming-uniform, B zero (starts as the base).

What a generic transformer gives and what it does not: the modality of each token and which
tokens are the question come with the data (:func:`set_modalities`, the :func:`modalities`
context, or :func:`read_modalities_from_batches` for batch keys ``modality_ids`` and
``question_mask``), shaped (batch, seq) like the input's tokens. Without modality ids every token
is text: plain LoRA with A_0 (what the code does while decoding one token at a time). Without a
question mask there is no cross-attention. Not covered: the vision/audio encoders and projectors
that make the non-text tokens (the model's own business), and the code's evaluation switches
(``reserved_modality``). The attention is not causal (as in the code): a text token's output does
not change, but a non-text token sees the question wherever it is.

The modalities' A run as one matmul over M·r units, each token keeping its modality's r units
(a one-hot gate, lorazoo.routing.gate_experts' rule), and the attention is one batched
(batch, T, T) product over the rank-r rows; no loop over modalities or samples (the code loops
over samples). Not mergeable.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorazooError
from ..parts import Form, check_number
from ..registry import FORMS
from ..routing import checked_labels, labelled_forms, set_labels


@FORMS.register("moka", paper="MokA (Wei et al., 2025) [15]",
                equations="h = s·A_m x for a token of modality m; non-text: h += λ·softmax(h Kᵀ/sqrt(N_q)) K over "
                          "the question's text rows K; y = W0 x + B h",
                summary="one A per modality, text-question cross-attention in the rank space, one shared B")
class MoKA(Form):
    """A_m stored side by side (M·r, in), one B (out, r)."""

    mergeable = False
    rank_bound = "r"
    options = {"moka_modalities": 3, "moka_cross_weight": 1.0}
    label_kind = "modality"

    @classmethod
    def validate(cls, opts):
        check_number("moka_modalities", opts["moka_modalities"], minimum=1, integer=True, maximum=64)
        check_number("moka_cross_weight", opts["moka_cross_weight"])

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.modalities = int(opts["moka_modalities"])
        self.cross_weight = float(opts["moka_cross_weight"])
        self.A = nn.Parameter(torch.empty(self.modalities * rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.sample_labels: torch.Tensor | None = None   # per-token modality ids (flattened)
        self.question: torch.Tensor | None = None        # per-token question mask (batch, seq)
        self.reset_parameters()

    @property
    def label_classes(self) -> int:
        return self.modalities

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x, y, weight, mask=None):
        r = self.rank
        tokens = x.shape[:-1].numel()
        ids = checked_labels(self, tokens, x.device)
        if ids is None:  # every token text: A_0 alone, LoRA's cost
            h = self.rank_masked(F.linear(x, self.A[:r]), mask) * self.scale
        else:
            onehot = F.one_hot(ids, self.modalities).to(x.dtype).reshape(*x.shape[:-1], self.modalities, 1)
            h = (F.linear(x, self.A).unflatten(-1, (self.modalities, r)) * onehot).sum(-2)  # each token's A_m
            h = self.rank_masked(h, mask) * self.scale
            if self.question is not None and self.cross_weight > 0 and x.dim() == 3:
                h = h + self.cross_weight * self._cross(h, ids.reshape(x.shape[:-1]))
        return y + F.linear(h, self.B)

    def _cross(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """λ-less cross-attention term for the non-text tokens, zero on text tokens, (batch, T, r)."""
        q = self.question.to(h.device)
        if q.shape != ids.shape:
            raise LorazooError(f"the question mask has shape {tuple(q.shape)}, but the input's tokens are "
                               f"{tuple(ids.shape)}; give one flag per token")
        keys = h * q.unsqueeze(-1).to(h.dtype)
        span = (q.cumsum(-1) > 0) & (q.flip(-1).cumsum(-1).flip(-1) > 0)  # first..last question token
        n_q = q.sum(-1).to(h.dtype)                                         # (batch,)
        score = h @ keys.transpose(-1, -2) / n_q.clamp(min=1).sqrt()[:, None, None]
        score = score.masked_fill(~span[:, None, :], float("-inf"))
        has = (n_q > 0)[:, None, None]
        attn = torch.where(has, score, torch.zeros_like(score)).softmax(-1)
        out = attn @ keys
        return out * ((ids != 0) & (n_q > 0)[:, None]).unsqueeze(-1).to(h.dtype)


def set_modalities(handle, modality_ids, question_mask=None) -> None:
    """Per-token modality ids (0 text, 1.. the others; shaped like the input's tokens) and question
    mask (bool, same shape; the text tokens the other modalities attend to) of the next forwards;
    ``modality_ids=None`` clears both (every token text)."""
    forms = labelled_forms(handle, MoKA)
    set_labels(handle, MoKA, modality_ids)
    q = None
    if modality_ids is not None and question_mask is not None:
        q = torch.as_tensor(question_mask).bool()
        ids = torch.as_tensor(modality_ids)
        if q.shape != ids.shape:
            raise LorazooError(f"question_mask has shape {tuple(q.shape)}, modality_ids {tuple(ids.shape)}; "
                               f"give both per token")
        if bool((q & (ids != 0)).any()):
            raise LorazooError("question tokens must be text tokens (modality 0)")
    for f in forms:
        f.question = q


@contextlib.contextmanager
def modalities(handle, modality_ids, question_mask=None):
    """``with modalities(handle, ids, question): model(...)``: they hold inside the block only."""
    set_modalities(handle, modality_ids, question_mask)
    try:
        yield
    finally:
        set_modalities(handle, None)


def read_modalities_from_batches(handle, key: str = "modality_ids", question_key: str = "question_mask"):
    """Make ``model(**batch)`` take the modality ids and question mask from the batch (both keys
    removed before the model sees it; a batch without ``key`` runs every token as text)."""
    labelled_forms(handle, MoKA)

    def hook(module, args, kwargs):
        set_modalities(handle, kwargs.pop(key, None), kwargs.pop(question_key, None))
        return args, kwargs

    return handle.model.register_forward_pre_hook(hook, with_kwargs=True)
