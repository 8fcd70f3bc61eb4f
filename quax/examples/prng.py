"""`ThreeFry(seed)` and `split`/`uniform`/`normal`, as the Quax library's
`quax.examples.prng` (backed by `quax.prng`)."""

from ..prng import (
    PRNG as PRNG,
    ThreeFry as ThreeFry,
    normal as normal,
    split as split,
    uniform as uniform,
)
