"""`cond`: `lax.cond` and `lax.switch` with values among the branch operands.

Every branch is walked on the values. An output that every branch returns as the same
kind of value (same class, static fields and leaf shapes) stays a value; any other
output is materialised in every branch, so the branches agree. The result is emitted
again as one conditional through the public `jax.lax.switch`.
"""

from typing import Any

import jax

from .. import _compat
from .._dispatch import materialise_all
from .._walker import bind, register, walk_closed
from ._common import abstract_call, dense, value_types


@register(_compat.cond_p)
def cond_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    if eqn.params.get("branches_platforms") is not None:
        # `lax.platform_dependent`: re-emitting it through `switch` would lower every
        # branch on every platform. Materialising keeps JAX's own lowering.
        return bind(eqn, materialise_all(eqn, invals))
    index, *operands = invals
    index = dense(index, eqn, invals)
    branches = eqn.params["branches"]
    kinds = [
        value_types(abstract_call(_walker_of(branch), operands)) for branch in branches
    ]
    keep = tuple(
        kind is not None and all(other[i] == kind for other in kinds)
        for i, kind in enumerate(kinds[0])
    )
    fns = [_walker_of(branch, keep, eqn) for branch in branches]
    # Runs inside the context `run_eqn` set for `eqn`: the new `cond` keeps its line.
    return list(jax.lax.switch(index, fns, operands))


def _walker_of(
    branch: Any, keep: tuple[bool, ...] | None = None, eqn: Any = None
) -> Any:
    def run(operands: list[Any]) -> list[Any]:
        outs = walk_closed(branch, operands)
        if keep is None:
            return outs
        return [
            x if k else dense(x, eqn, outs) for x, k in zip(outs, keep, strict=True)
        ]

    return run
