"""lorazoo: LoRA and its published variants behind one interface, each checked against its paper."""
from .adapt import adapt
from .combine import combine
from .errors import LoadError, LorazooError, NotMergeableError, SpecError, TargetError
from .handle import AdapterHandle, activate, delete, handles_of
from .io import load
from .mixed import mixed_batch
from .peft_files import load_peft
from .quantize import quantize
from .spec import AdapterSpec
from .variants import describe, variants
from .version import __version__

__all__ = [
    "AdapterSpec", "AdapterHandle", "adapt", "combine", "load", "load_peft", "activate", "delete", "handles_of", "mixed_batch",
    "quantize",
    "variants", "describe", "LorazooError", "SpecError", "TargetError", "LoadError",
    "NotMergeableError", "__version__",
]
