"""Which layers of a model an adapter goes on.

``targets`` is a list of names (a layer's path or its suffix after a dot), a regex over paths,
"all-linear" (every nn.Linear / HF Conv1D but the output head) or "all-conv" (every nn.Conv2d
with groups == 1; grouped and depthwise convs are skipped). Conv2d layers named explicitly or by
a regex are adapted too (see lorazoo.conv); a grouped or depthwise one raises a TargetError.
nn.Embedding layers are adapted when named or matched by a regex (see lorazoo.embedding), never by
"all-linear".
"""
from __future__ import annotations

import re

from torch import nn

from .conv import check_conv, is_conv2d
from .embedding import check_embedding, is_embedding
from .errors import TargetError
from .layer import AdaptedLayer, is_linear_like
from .saved import SavedModule

# Output heads that "all-linear" leaves alone (as PEFT does): they map to labels or the vocabulary.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "head")


def _output_head_ids(model: nn.Module) -> set[int]:
    ids = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except Exception:  # noqa: BLE001 - models without a head raise various errors
            out = None
        if out is not None:
            ids.add(id(out))
    return ids


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like, Conv2d or Embedding layer (or already adapted layer), by dotted path; none
    inside a ``modules_to_save`` wrapper (lorazoo.saved)."""
    found, saved = {}, []
    for path, mod in model.named_modules():
        if any(path.startswith(s + ".") for s in saved):
            continue  # the original and the copies inside a modules_to_save wrapper are not targets
        if isinstance(mod, SavedModule):
            saved.append(path)
        elif isinstance(mod, AdaptedLayer):
            found[path] = mod
        elif (is_linear_like(mod) or is_conv2d(mod) or is_embedding(mod)) and not path.endswith(".base"):
            found[path] = mod
    return found


def select_targets(model: nn.Module, targets) -> dict[str, nn.Module]:
    """Resolve ``targets`` (names/suffixes, a regex, "all-linear" or "all-conv") to layers, or raise."""
    layers = candidate_layers(model)
    if targets == "all-linear":
        heads = _output_head_ids(model)
        chosen = {p: m for p, m in layers.items()
                  if id(m) not in heads and id(getattr(m, "base", None)) not in heads
                  and p.split(".")[-1] not in HEAD_NAMES and not is_conv2d(getattr(m, "base", m))
                  and not is_embedding(getattr(m, "base", m))}
        what = "'all-linear'"
    elif targets == "all-conv":
        chosen = {p: m for p, m in layers.items()
                  if is_conv2d(getattr(m, "base", m)) and getattr(m, "base", m).groups == 1}
        what = "'all-conv'"
    elif isinstance(targets, str):
        rx = re.compile(targets)
        chosen = {p: m for p, m in layers.items() if rx.fullmatch(p) or p.endswith("." + targets)}
        what = f"regex {targets!r}"
    else:
        chosen = {p: m for p, m in layers.items() if any(p == t or p.endswith("." + t) for t in targets)}
        missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in layers)]
        if missing and chosen:
            raise TargetError(f"target(s) {', '.join(map(repr, missing))} match no linear layer; "
                              f"{_examples(layers)}")
        what = f"targets {targets!r}"
    if not chosen:
        raise TargetError(f"{what} matched no linear layer in {type(model).__name__}; {_examples(layers)}")
    for p, m in chosen.items():
        if is_conv2d(getattr(m, "base", m)):
            check_conv(p, getattr(m, "base", m))
        elif is_embedding(getattr(m, "base", m)):
            check_embedding(p, getattr(m, "base", m))
    return chosen


def _examples(layers: dict) -> str:
    names = sorted({p.split(".")[-1] for p in layers})
    if not names:
        return "the model has no nn.Linear, Conv1D or Conv2d layer"
    return f"its linear and conv layers end in: {', '.join(names[:20])}"
