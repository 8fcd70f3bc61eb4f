"""Arrays with named axes (see `quax.types.named`)."""

from .types.named import (
    AxisNameError as AxisNameError,
    Broadcast as Broadcast,
    NamedArray as NamedArray,
    Positional as Positional,
    trace as trace,
)
