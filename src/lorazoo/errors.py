"""The errors lorazoo raises. Each says what is wrong and how to fix it."""


class LorazooError(ValueError):
    """Base class: bad input or a request that cannot be met."""


class SpecError(LorazooError):
    """An adapter spec is invalid: unknown part, bad number, conflicting parts."""


class TargetError(LorazooError):
    """Target selection matched nothing, or a layer cannot take the adapter."""


class LoadError(LorazooError):
    """A saved adapter cannot be loaded onto this model."""


class NotMergeableError(LorazooError):
    """The adapter's update cannot be folded into the base weight."""
