"""Save and load adapters: safetensors for tensors, JSON for the spec. Never pickle."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import LoadError, LorazooError, SpecError
from .fingerprint import base_weights, fingerprint, mismatches, short
from .handle import AdapterHandle, handles_of
from .targets import candidate_layers
from .version import FORMAT, __version__

TENSORS = "adapter.safetensors"
CONFIG = "adapter_config.json"


def save(handle: AdapterHandle, path) -> None:
    """Write the adapter atomically: a failure leaves any earlier save in ``path`` intact."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorazooError(f"cannot save into {str(path)!r}: it is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in handle.state_dict().items()}
    config = {
        "lorazoo_version": __version__,
        "format": FORMAT,
        "name": handle.name,
        "spec": handle.spec.to_dict(),
        "targets": sorted(handle.ranks),
        "ranks": handle.ranks,
        "base_fingerprint": short(handle.fingerprint),
        "fingerprint": handle.fingerprint,
    }
    _atomic(path / TENSORS, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    _atomic(path / CONFIG, lambda f: Path(f).write_text(json.dumps(config, indent=1)))


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_config(path) -> dict:
    path = Path(path)
    cfile = path / CONFIG
    if not cfile.is_file():
        raise LoadError(f"{str(path)!r} holds no {CONFIG}; is it a folder written by handle.save()?")
    try:
        config = json.loads(cfile.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfile} is not valid JSON ({e}); the file is damaged, save the adapter again") from None
    if not isinstance(config, dict) or "spec" not in config or "ranks" not in config:
        raise LoadError(f"{cfile} is not a lorazoo adapter config (no 'spec' or 'ranks')")
    if int(config.get("format", 0)) > FORMAT or _newer(config.get("lorazoo_version", "0"), __version__):
        raise LoadError(
            f"adapter was saved by lorazoo {config.get('lorazoo_version')} (format {config.get('format')}), "
            f"newer than this lorazoo {__version__} (format {FORMAT}); upgrade lorazoo to load it"
        )
    return config


def _newer(a: str, b: str) -> bool:
    def key(v):
        return tuple(int(x) if x.isdigit() else 0 for x in str(v).split(".")[:3])

    return key(a) > key(b)


def load(model: nn.Module, path, name: str | None = None) -> AdapterHandle:
    """Load a saved adapter onto ``model`` and return its handle.

    Every check (config, version, file integrity, base fingerprint, tensor names and shapes) runs
    before the model is changed; on any error the model is left as it was.
    """
    from .adapt import adapt
    from .spec import AdapterSpec

    path = Path(path)
    config = read_config(path)
    name = name or config.get("name", "default")
    try:
        spec = AdapterSpec.from_dict(config["spec"])
    except (SpecError, TypeError) as e:
        raise LoadError(f"the saved spec is not valid for this lorazoo: {e}") from None
    if name in handles_of(model):
        raise LoadError(f"model already has an adapter named {name!r}; pass name=... to load it under another")
    try:
        tensors = load_file(str(path / TENSORS))
    except FileNotFoundError:
        raise LoadError(f"{str(path)!r} has no {TENSORS}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"{path / TENSORS} is truncated or corrupt ({e}); save the adapter again") from None

    layers = candidate_layers(model)
    missing = [p for p in config["ranks"] if p not in layers]
    if missing:
        raise LoadError(f"the model has no layer(s) {', '.join(missing[:5])} that this adapter was made for; "
                        f"load it onto the base model it was trained on")
    saved_fp = config.get("fingerprint", {})
    bad = mismatches(saved_fp, fingerprint(base_weights({p: layers[p] for p in saved_fp if p in layers})))
    if bad:
        raise LoadError(
            f"this adapter was made for a different base model (fingerprint {config.get('base_fingerprint')}); "
            f"weights differ at {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
        )
    targets = sorted(config["ranks"])
    spec_t = AdapterSpec.from_dict({**config["spec"], "targets": targets})
    handle = adapt(model, spec_t, name=name, ranks=config["ranks"], _initialize=False)
    handle.spec = spec
    try:
        _load_state(handle, tensors)
    except LoadError:
        handle.delete()
        raise
    return handle


@torch.no_grad()
def _load_state(handle: AdapterHandle, tensors: dict[str, torch.Tensor]) -> None:
    own = handle.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise LoadError(f"adapter file does not match its spec: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in own.items():
        t = tensors[k]
        resizable = k.endswith((".shift_A", ".shift_B"))
        if t.shape != v.shape and not resizable:
            raise LoadError(f"tensor {k} has shape {tuple(t.shape)} in the file but {tuple(v.shape)} here")
    # apply: base shifts first (they change the frozen base), then everything else
    for path, layer in handle.layers().items():
        B, A = tensors[f"{path}.shift_B"], tensors[f"{path}.shift_A"]
        if A.shape[0]:
            layer.adapters[handle.name].shift_base(layer.linear_weight(), B, A)
    for k, v in own.items():
        if not k.endswith((".shift_A", ".shift_B")):
            v.copy_(tensors[k])
