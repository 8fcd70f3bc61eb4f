"""Structured matrices: tridiagonal, diagonal, scaled identity, Kronecker products
(see `quax.types.structured`)."""

from .types.structured import (
    Diagonal as Diagonal,
    Identity as Identity,
    Kronecker as Kronecker,
    TridiagonalMatrix as TridiagonalMatrix,
    solve as solve,
)
