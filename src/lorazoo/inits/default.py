"""The form's own paper initialization."""
from ..parts import Init
from ..registry import INITS


@INITS.register("default", summary="each form's own init from its paper (LoRA: A Kaiming, B zero)")
class DefaultInit(Init):
    needs_factors = False
