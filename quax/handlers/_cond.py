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

Inside quaxify's rewrite (`quax._rewrite`), a conditional whose branches agree is not
walked: `rewrite_cond` rewrites each branch as a jaxpr over the leaves and makes the
new `cond` equation directly; where they disagree, it declines and `cond_handler` runs.
"""

from typing import Any

import jax
import jax.extend.core as jexc

from .. import _compat
from .._rewrite import EQN_REWRITERS, Val, as_reads, read_leaves, rewrite
from .._strict import STATE
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


def rewrite_cond(
    eqn: Any, reads: list[Any]
) -> tuple[Any, list[Any], list[tuple[Any, Any]]] | None:
    """A `cond` met in a rewrite (`quax._rewrite`): the same `cond` equation over the
    leaves, made directly, each branch rewritten as a jaxpr (equations no value
    reaches kept, the others traced as fragments) rather than walked twice. None,
    and a fragment runs `cond_handler`, where the branches' outputs disagree in kind
    or type (`cond_handler` joins them), the index is a value, the params are not
    those this knows, or under `quax.explain`.

    Constants a branch's fragments made become operands of the new equation; every
    branch takes all of them (a branch ignores the others')."""
    params = eqn.params
    if STATE.recorder is not None or not set(params) <= _COND_PARAMS:
        return None
    index, *rest = reads
    if type(index) is Val:
        return None
    atoms, spec = read_leaves(rest)
    avals = [a.aval for a in atoms]
    n = len(rest)
    outs = []
    for k, branch in enumerate(params["branches"]):
        got = rewrite(branch, [None] * n, [False] * n, avals, spec, f"branch_{k}")
        if got is None or got[2]:
            return None
        outs.append(got)
    first_spec, first_avals = outs[0][1], outs[0][0].out_avals
    if any(o[1] != first_spec or o[0].out_avals != first_avals for o in outs[1:]):
        return None  # the branches disagree: `cond_handler` joins them
    consts = [
        (jexc.Var(v.aval), c)
        for closed, _, _ in outs
        for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True)
    ]
    branches = []
    start = 0
    for closed, _, _ in outs:
        jaxpr = closed.jaxpr
        own = list(jaxpr.constvars)
        ignored = [jexc.Var(v.aval) for v, _ in consts]
        ignored[start : start + len(own)] = own
        start += len(own)
        branches.append(
            jexc.ClosedJaxpr(
                jaxpr.replace(constvars=[], invars=[*ignored, *jaxpr.invars]), ()
            )
        )
    effects = set().union(*(b.effects for b in branches))
    outvars = [jexc.Var(a) for a in first_avals]
    new_eqn = jexc.new_jaxpr_eqn(
        [index, *(v for v, _ in consts), *atoms],
        outvars,
        eqn.primitive,
        dict(params, branches=tuple(branches)),
        effects,
        eqn.source_info,
        eqn.ctx,
    )
    return new_eqn, as_reads(first_spec, iter(outvars)), consts


#: The params of a `cond` equation that `rewrite_cond` knows.
_COND_PARAMS = frozenset(("branches", "branches_platforms"))

EQN_REWRITERS[_compat.cond_p] = rewrite_cond
