"""`NamedArray(array, axes, allow_materialise=False)` with `Axis(size)` names, as the
Quax library's `quax.examples.named` (backed by `quax.named`)."""

import dataclasses

from ..named import NamedArray as NamedArray, trace as trace


@dataclasses.dataclass(frozen=True, eq=False)
class Axis:
    """A named axis, equal only to itself; `size` (if not None) is checked when a
    `NamedArray` is built with it."""

    size: int | None


__all__ = ["Axis", "NamedArray", "trace"]
