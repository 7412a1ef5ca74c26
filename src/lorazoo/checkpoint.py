"""Training checkpoints on disk: safetensors and JSON only, never pickle.

A checkpoint is one folder ``<dir>/step-00000012/`` holding

- ``adapter.safetensors`` + ``adapter_config.json``: the adapter (``handle.save``), loadable with
  ``lorazoo.load`` like any saved adapter;
- ``trainer.safetensors``: every tensor of the training state: optimizer state
  (``optimizer.<param index>.<key>``), the schedule and optim parts' tensors (``schedule.<key>``,
  ``optim.<key>``), the torch RNG states (``rng.torch``, ``rng.cuda.<i>``, uint8);
- ``trainer.json``: the index of the rest: step, data position, losses, the optimizer's parameter
  groups and non-tensor state, the parts' non-tensor state, python's and numpy's RNG states, the
  trainer's options (checked on resume) and the caller's ``extra``.

The folder is written under a temporary name in ``<dir>`` and renamed into place, so a save killed
at any moment leaves the previous checkpoint whole; older checkpoints are removed only after the new
one is in place. Knows nothing of the trainer's loop: :mod:`lorazoo.train` builds on it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LoadError, LorazooError
from .files import read_config, read_tensors
from .fingerprint import mismatches
from .version import __version__

STATE_TENSORS = "trainer.safetensors"
STATE_JSON = "trainer.json"
CHECKPOINT_FORMAT = 1
_STEP = re.compile(r"^step-(\d+)$")


# --- folders ----------------------------------------------------------------------------------
def checkpoint_folders(directory) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (temporaries are not listed)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _STEP.match(p.name)) and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = checkpoint_folders(directory)
    return found[-1] if found else None


def write_checkpoint(directory, step: int, handle, tensors: dict[str, torch.Tensor], state: dict,
                     keep: int = 1) -> Path:
    """Write one checkpoint atomically into ``directory``/step-NNNNNNNN; keep the newest ``keep``."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise LorazooError(f"cannot write checkpoints into {str(d)!r}: it is a file, not a folder")
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".tmp-step-*"):  # a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    target = d / f"step-{int(step):08d}"
    tmp = Path(tempfile.mkdtemp(dir=d, prefix=".tmp-step-"))
    try:
        handle.save(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS),
                  metadata={"format": "pt"})
        state = {"format": CHECKPOINT_FORMAT, "lorazoo_version": __version__, **state}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        _fsync_folder(tmp)
        if target.exists():  # the same step saved again: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=d, prefix=".tmp-step-old-"))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_folders(d)[:-max(1, int(keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_folder(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def read_checkpoint(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder; LoadError if it is damaged."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{str(folder)!r} holds no {STATE_JSON}: it is not a lorazoo training checkpoint") from None
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{folder / STATE_JSON} is not valid JSON ({str(e)[:200]}); the checkpoint is "
                        f"damaged") from None
    if not (isinstance(state, dict) and isinstance(state.get("format"), int) and isinstance(state.get("step"), int)):
        raise LoadError(f"{folder / STATE_JSON} is not a lorazoo training checkpoint (no format or step)")
    if state["format"] > CHECKPOINT_FORMAT:
        raise LoadError(f"the checkpoint {folder} was written by a newer lorazoo ({state.get('lorazoo_version')}); "
                        f"upgrade lorazoo to resume from it")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except FileNotFoundError:
        raise LoadError(f"{str(folder)!r} holds no {STATE_TENSORS}; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"{folder / STATE_TENSORS} is truncated or corrupt ({e})") from None
    return tensors, state


# --- the adapter, restored in place -----------------------------------------------------------
def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


@torch.no_grad()
def restore_adapter(handle, folder) -> None:
    """Load the adapter saved in ``folder`` into ``handle`` in place (same spec and base model).

    Base shifts (PiSSA's residual, ReLoRA's merges) are brought to the saved ones: a saved shift that
    extends the current one (a re-run init, then merges) only adds the missing part, so the frozen
    base is not rebuilt; any other is undone and redone.
    """
    config = read_config(folder)
    tensors = read_tensors(folder, config)
    if _json(config["spec"]) != _json(handle.spec.to_dict()):
        raise LoadError(f"the checkpoint in {folder} was made with another adapter spec; resume with the spec "
                        f"it was trained with")
    bad = mismatches(config["fingerprint"], handle.fingerprint)  # within rounding: sums depend on threads
    if bad:
        raise LoadError(f"the checkpoint in {folder} was made for a different base model (weights differ at "
                        f"{', '.join(bad[:3])}); resume on the model it was trained on")
    if handle.merged:
        raise LorazooError(f"adapter {handle.name!r} is merged; unmerge() it before resuming training")
    own = handle.state_dict()
    shifts = (".shift_A", ".shift_B")
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise LoadError(f"the checkpoint's adapter does not match this one: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}")
    for k, v in own.items():
        if not k.endswith(shifts) and tensors[k].shape != v.shape:
            raise LoadError(f"tensor {k} has shape {tuple(tensors[k].shape)} in the checkpoint but "
                            f"{tuple(v.shape)} here")
    for path, layer in handle.layers().items():
        ad = layer.adapters[handle.name]
        B, A = tensors[f"{path}.shift_B"], tensors[f"{path}.shift_A"]
        k = ad.shift_A.shape[0]
        weight = layer.linear_weight()
        prefix = (k <= A.shape[0] and B.shape[0] == ad.shift_B.shape[0]
                  and torch.equal(ad.shift_A, A[:k].to(ad.shift_A))
                  and torch.equal(ad.shift_B, B[:, :k].to(ad.shift_B)))
        if not prefix:
            if k:
                weight.sub_(ad.shift_B @ ad.shift_A)
            ad.shift_B, ad.shift_A = ad.shift_B[:, :0], ad.shift_A[:0]
            k = 0
        if A.shape[0] > k:
            ad.shift_base(weight, B[:, k:], A[k:])
    for k, v in own.items():
        if not k.endswith(shifts):
            v.copy_(tensors[k])


# --- optimizer ---------------------------------------------------------------------------------
def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON index) of ``optimizer.state_dict()``."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{key}"] = v
            else:
                other.setdefault(str(idx), {})[key] = v
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], index: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for idx, st in index.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = index.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise LoadError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this one "
                        f"{len(optimizer.param_groups)}; resume with the same adapter spec and optimizer")
    fixed = []
    for saved, now in zip(groups, optimizer.param_groups):  # JSON made tuples (betas) lists
        fixed.append({k: tuple(v) if isinstance(now.get(k), tuple) and isinstance(v, list) else v
                      for k, v in saved.items()})
    try:
        optimizer.load_state_dict({"state": state, "param_groups": fixed})
    except (ValueError, KeyError, RuntimeError) as e:
        raise LoadError(f"the checkpoint's optimizer state does not fit this optimizer ({e})") from None


# --- parts (schedule, optim) -------------------------------------------------------------------
def part_state(prefix: str, part) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, other = {}, {}
    for k, v in part.state_dict().items():
        if torch.is_tensor(v):
            tensors[f"{prefix}.{k}"] = v
        else:
            other[k] = v
    return tensors, other


def load_part_state(prefix: str, part, tensors: dict[str, torch.Tensor], other: dict) -> None:
    state = dict(other)
    state.update({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    if state:
        part.load_state_dict(state)


# --- random number generators --------------------------------------------------------------------
def torch_rng_state() -> dict[str, torch.Tensor]:
    """The torch RNG states (CPU, and CUDA when in use): cheap enough to take before every step."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a training step may draw from: torch (CPU, and CUDA when in use), python, numpy."""
    tensors = torch_rng_state()
    version, internal, gauss = random.getstate()
    other: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return tensors, other
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    other["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return tensors, other


def set_rng_state(tensors: dict[str, torch.Tensor], other: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    if "python" in other:
        version, internal, gauss = other["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in other:
        import numpy as np

        name, keys, pos, has_gauss, cached = other["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def set_torch_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    set_rng_state(tensors, {})
