"""The adapter folder on disk: ``adapter.safetensors`` and ``adapter_config.json``. Never pickle.

The config is written twice: inside the safetensors header (metadata key ``lorazoo_config``),
where it is replaced together with the tensors by one atomic rename, and as the readable JSON
beside it. Loading reads the copy in the header, so a save killed between the two renames still
leaves a matching pair (new tensors, new config); the JSON is read only for files without it.
Knows nothing of models or handles: ``handle.save`` and ``io.load`` build on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import jsonschema
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import LoadError, LorazooError
from .version import FORMAT, __version__

TENSORS = "adapter.safetensors"
CONFIG = "adapter_config.json"

_NAME = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_\-]*$"}
_NUMBER = {"type": "number", "minimum": -1e300, "maximum": 1e300}
SCHEMA = {  # what a config must look like before anything else reads it
    "type": "object",
    "required": ["format", "lorazoo_version", "name", "spec", "ranks", "fingerprint"],
    "properties": {
        "format": {"type": "integer", "minimum": 1, "maximum": 1000},
        "lorazoo_version": {"type": "string", "maxLength": 64},
        "name": _NAME,
        "spec": {"type": "object"},
        "targets": {"type": "array", "items": {"type": "string"}},
        "ranks": {"type": "object",  # empty for a parameter selection (FT, BitFit: lorazoo.baselines)
                  "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 2**31}},
        "base_fingerprint": {"type": "string"},
        "fingerprint": {"type": "object", "minProperties": 1, "additionalProperties": {
            "type": "array", "prefixItems": [
                {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2**40}},
                {"type": "array", "items": _NUMBER, "minItems": 3, "maxItems": 3}],
            "minItems": 2, "maxItems": 2}},
        "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "config_checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}


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
    """The adapter's config: from the tensors file's header, else from the JSON beside it; checked
    against :data:`SCHEMA` so that every later step can trust its types."""
    path = Path(path)
    cfile = path / CONFIG
    text, where = _header_config(path / TENSORS), path / TENSORS
    try:
        if text is None:
            if not cfile.is_file():
                raise LoadError(f"{str(path)!r} holds no {CONFIG}; is it a folder written by handle.save()?")
            text, where = cfile.read_text(encoding="utf-8"), cfile
        config = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, int-size and nesting errors
        raise LoadError(f"the config in {where} is not valid JSON ({str(e)[:200]}); the file is damaged, "
                        f"save the adapter again") from None
    if not isinstance(config, dict) or "spec" not in config or "ranks" not in config:
        raise LoadError(f"{where} is not a lorazoo adapter config (no 'spec' or 'ranks')")
    version = config.get("lorazoo_version")
    fmt = config.get("format")
    if (isinstance(fmt, int) and fmt > FORMAT) or (isinstance(version, str) and _newer(version, __version__)):
        raise LoadError(
            f"adapter was saved by lorazoo {version} (format {fmt}), newer than this lorazoo "
            f"{__version__} (format {FORMAT}); upgrade lorazoo to load it")
    try:
        jsonschema.validate(config, SCHEMA)
    except jsonschema.ValidationError as e:
        at = "/".join(str(k) for k in e.absolute_path) or "the top level"
        raise LoadError(f"the config in {where} is not a valid lorazoo adapter config: at {at}, "
                        f"{e.message[:200]}") from None
    missing = [k for k in ("checksum", "config_checksum") if k not in config]
    if config["format"] >= 2 and missing:
        raise LoadError(f"the config in {where} has no {' or '.join(missing)}, which format {config['format']} "
                        f"files carry; the file was edited or damaged, save the adapter again")
    if config["format"] >= 2 and config_checksum(config) != config["config_checksum"]:
        raise LoadError(f"the config in {where} does not match the checksum it records: it was changed after "
                        f"saving (a damaged byte can turn alpha=16 into 36); save the adapter again")
    return config


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_checksum(config: dict) -> str:
    """SHA-256 of the config as JSON (sorted keys), without its own ``config_checksum``: the tensors'
    checksum cannot see a damaged number in the config (alpha, dropout, an option)."""
    body = {k: v for k, v in config.items() if k != "config_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_tensors(path, config: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked: readable, the checksum the config records, float and finite."""
    f = Path(path) / TENSORS
    try:
        tensors = load_file(str(f))
    except FileNotFoundError:
        raise LoadError(f"{str(path)!r} has no {TENSORS}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"{f} is truncated or corrupt ({e}); save the adapter again") from None
    if "checksum" in config and checksum(tensors) != config["checksum"]:
        raise LoadError(f"{f} does not match the checksum its config records: its bytes were changed "
                        f"after saving; save the adapter again")
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise LoadError(f"tensor {k} in {f} is {t.dtype}; adapters hold floating-point tensors only")
        if not torch.isfinite(t).all():
            raise LoadError(f"tensor {k} in {f} holds NaN or infinite values; the adapter diverged or the "
                            f"file is damaged")
    return tensors


def _header_config(tensors: Path) -> str | None:
    try:
        with safe_open(str(tensors), framework="pt") as f:
            return (f.metadata() or {}).get("lorazoo_config")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # missing or damaged: the tensors' own load reports it


def _newer(a: str, b: str) -> bool:
    def key(v):
        return tuple(int(x) if x.isdigit() else 0 for x in str(v).split(".")[:3])

    return key(a) > key(b)


def write_adapter(path, tensors: dict, config: dict) -> None:
    """Write tensors and config into the folder ``path``; a failure leaves an earlier save intact."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorazooError(f"cannot save into {str(path)!r}: it is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob(f".{TENSORS}.*"), *path.glob(f".{CONFIG}.*")]:
        stale.unlink(missing_ok=True)  # temporaries of an earlier save that was killed
    config = {"lorazoo_version": __version__, "format": FORMAT, **config, "checksum": checksum(tensors)}
    config = json.loads(json.dumps(config))  # as a load will read it back (tuples as lists, ...)
    config["config_checksum"] = config_checksum(config)
    text = json.dumps(config, indent=1)
    _atomic(path / TENSORS, lambda f: save_file(tensors, f, metadata={"format": "pt", "lorazoo_config": text}))
    _atomic(path / CONFIG, lambda f: Path(f).write_text(text))
