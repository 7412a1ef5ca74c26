"""lorazoo: LoRA and its published variants behind one interface, each checked against its paper."""
from .adapt import adapt
from .errors import LoadError, LorazooError, NotMergeableError, SpecError, TargetError
from .handle import AdapterHandle, activate, delete, handles_of
from .io import load
from .spec import AdapterSpec
from .variants import describe, variants
from .version import __version__

__all__ = [
    "AdapterSpec", "AdapterHandle", "adapt", "load", "activate", "delete", "handles_of",
    "variants", "describe", "LorazooError", "SpecError", "TargetError", "LoadError",
    "NotMergeableError", "__version__",
]
