"""The adapter folder on disk: ``adapter.safetensors`` and ``adapter_config.json``. Never pickle.

The config is written twice: inside the safetensors header (metadata key ``lorazoo_config``),
where it is replaced together with the tensors by one atomic rename, and as the readable JSON
beside it. Loading reads the copy in the header, so a save killed between the two renames still
leaves a matching pair (new tensors, new config); the JSON is read only for files without it.
Knows nothing of models or handles: ``handle.save`` and ``io.load`` build on it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import LoadError, LorazooError
from .version import FORMAT, __version__

TENSORS = "adapter.safetensors"
CONFIG = "adapter_config.json"


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
    """The adapter's config: from the tensors file's header, else from the JSON beside it."""
    path = Path(path)
    cfile = path / CONFIG
    text, where = _header_config(path / TENSORS), path / TENSORS
    if text is None:
        if not cfile.is_file():
            raise LoadError(f"{str(path)!r} holds no {CONFIG}; is it a folder written by handle.save()?")
        text, where = cfile.read_text(), cfile
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(f"the config in {where} is not valid JSON ({e}); the file is damaged, save the "
                        f"adapter again") from None
    if not isinstance(config, dict) or "spec" not in config or "ranks" not in config:
        raise LoadError(f"{cfile} is not a lorazoo adapter config (no 'spec' or 'ranks')")
    if int(config.get("format", 0)) > FORMAT or _newer(config.get("lorazoo_version", "0"), __version__):
        raise LoadError(
            f"adapter was saved by lorazoo {config.get('lorazoo_version')} (format {config.get('format')}), "
            f"newer than this lorazoo {__version__} (format {FORMAT}); upgrade lorazoo to load it"
        )
    return config


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
    text = json.dumps({"lorazoo_version": __version__, "format": FORMAT, **config}, indent=1)
    _atomic(path / TENSORS, lambda f: save_file(tensors, f, metadata={"format": "pt", "lorazoo_config": text}))
    _atomic(path / CONFIG, lambda f: Path(f).write_text(text))
