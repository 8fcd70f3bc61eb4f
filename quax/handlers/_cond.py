"""`cond`: `lax.cond`, `lax.switch` and `lax.platform_dependent` with values among the
branch operands.

Every branch is walked on the values. An output that every branch returns as the same
kind of value (same class, static fields and leaf shapes) stays a value. An output
whose branches disagree (a value in one, a plain array or another kind of value in
another) is re-expressed in one kind that holds them all when the value's class can
`join` them (`ArrayValue.join`: a LoRA weight and a dense array become LoRA weights,
the array with zero adapters), and otherwise materialised in every branch, so the
branches agree. The result is emitted again as one conditional through the public
`jax.lax.switch`, or, for a platform-dependent conditional,
`jax.lax.platform_dependent` with the same branches for the same platforms (so JAX
still picks the branch when it lowers the program).
"""

from typing import Any

import jax

from .. import _compat
from .._walker import register, walk_closed
from ._common import abstract_call, dense, join_kinds, join_to, value_types


#: How one output leaves every branch: as it is, or in a target kind (`join_to`: a
#: value to `join` into, or None to materialise).
_KEEP = object()


@register(_compat.cond_p)
def cond_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    index, *operands = invals
    index = dense(index, eqn, invals)
    branches = eqn.params["branches"]
    outs = [abstract_call(_walker_of(branch), operands) for branch in branches]
    kinds = [value_types(out) for out in outs]
    targets = []
    for i, kind in enumerate(kinds[0]):
        if all(other[i] == kind for other in kinds):
            targets.append(_KEEP)  # the same in every branch (a plain array: None)
        else:
            targets.append(join_kinds([out[i] for out in outs]))
    fns = [_walker_of(branch, targets, eqn) for branch in branches]
    platforms = eqn.params.get("branches_platforms")
    # Runs inside the context `run_eqn` set for `eqn`: the new `cond` keeps its line.
    if platforms is None:
        return list(jax.lax.switch(index, fns, operands))
    # The index was computed from the platform (`platform_index`); the new conditional
    # computes its own from the same branches and platforms.
    default = None
    per_platform: dict[str, Any] = {}
    for fn, names in zip(fns, platforms, strict=True):
        if names is None:
            default = fn
        else:
            per_platform.update(dict.fromkeys(names, fn))
    return list(jax.lax.platform_dependent(operands, default=default, **per_platform))


def _walker_of(branch: Any, targets: list[Any] | None = None, eqn: Any = None) -> Any:
    def run(operands: list[Any]) -> list[Any]:
        outs = walk_closed(branch, operands)
        if targets is None:
            return outs
        return [
            x if target is _KEEP else join_to(target, x, eqn, outs)
            for x, target in zip(outs, targets, strict=True)
        ]

    return run
