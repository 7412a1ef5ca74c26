"""Plain parameter groups, no gradient transform."""
from ..parts import Optim
from ..registry import OPTIMS


@OPTIMS.register("default", summary="one parameter group, gradients untouched")
class DefaultOptim(Optim):
    pass
