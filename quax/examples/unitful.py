"""`Unitful(array, units)` with `Dimension`s `kilograms`, `meters`, `seconds`, as the
Quax library's `quax.examples.unitful` (backed by `quax.units`): `units` is a
`Dimension` or a `{Dimension: exponent}` dict."""

from ..units import Unit, Unitful as Unitful, kg, m, s


#: `Dimension("kg")` is a new base dimension (a `quax.units.Unit`).
Dimension = Unit
kilograms = kg
meters = m
seconds = s

__all__ = ["Dimension", "Unitful", "kilograms", "meters", "seconds"]
