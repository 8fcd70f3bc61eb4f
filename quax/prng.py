"""PRNG keys as values (see `quax.types.prng`)."""

from .types.prng import (
    PRNG as PRNG,
    ThreeFry as ThreeFry,
    from_key as from_key,
    normal as normal,
    split as split,
    uniform as uniform,
)
