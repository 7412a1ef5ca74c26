"""No step-boundary behaviour."""
from ..parts import Schedule
from ..registry import SCHEDULES


@SCHEDULES.register("none", summary="nothing at step boundaries, no auxiliary loss")
class NoSchedule(Schedule):
    pass
