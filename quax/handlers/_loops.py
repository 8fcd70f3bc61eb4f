"""`while` (`lax.while_loop`, `fori_loop` with traced bounds) and `scan` (`lax.scan`,
`lax.map`, `fori_loop` with static bounds) with values as constants, carries and `xs`.

Values used as loop constants are closed over by the body, so their handlers run in
every iteration. A carry stays a value only if one iteration returns it as the same
kind of value (class, static fields, leaf shapes and dtypes); otherwise it is
materialised on entry and at the end of the body, and the body is walked again until
nothing changes (a fixed point, reached in at most one pass per carry). A value as
`xs` is sliced leaf by leaf only if its class opts in with `ArrayValue.scan_leafwise`
and every leaf has the scanned axis; otherwise it is materialised. Loops are emitted
again through the public `jax.lax.while_loop` and `jax.lax.scan`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core
import jax.tree_util as jtu

from .. import _compat
from .._errors import _MSG_BUG, HandlerResultError, QuaxBugError, describe_aval
from .._values import ArrayValue
from .._walker import register, walk_closed
from ._common import abstract_call, dense, leaf_type, value_types


_MSG_BAD_SLICE = """\
quax: {cls}.scan_leafwise() returned True, but {what} has aval {got} where `lax.scan` \
needs {expected}.
To fix: return False from {cls}.scan_leafwise() (quax then materialises the value), \
or make slicing (stacking) every leaf along axis 0 slice (stack) the value."""


@register(_compat.while_p)
def while_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    params = eqn.params
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = invals[:n_cond]
    body_consts = invals[n_cond : n_cond + n_body]
    carry = invals[n_cond + n_body :]
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]

    def step(carry: list[Any]) -> list[Any]:
        return walk_closed(body_jaxpr, [*body_consts, *carry])

    to_dense = _settle(lambda c: abstract_call(step, c), carry, eqn)

    def cond_fn(carry: list[Any]) -> Any:
        (pred,) = walk_closed(cond_jaxpr, [*cond_consts, *carry])
        return dense(pred, eqn, invals)

    def body_fn(carry: list[Any]) -> list[Any]:
        return _densify_at(step(carry), to_dense, eqn)

    return list(jax.lax.while_loop(cond_fn, body_fn, _densify_at(carry, to_dense, eqn)))


@register(_compat.scan_p)
def scan_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    params = eqn.params
    n_consts, n_carry = _compat.scan_split(params, len(invals))
    consts = invals[:n_consts]
    carry = invals[n_consts : n_consts + n_carry]
    length = params["length"]
    xs = [
        x if _slices_leafwise(x, length) else dense(x, eqn, invals)
        for x in invals[n_consts + n_carry :]
    ]
    body = params["jaxpr"]
    n_ys = len(eqn.outvars) - n_carry
    if len(body.jaxpr.outvars) != n_carry + n_ys:
        raise QuaxBugError(_MSG_BUG.format(what="scan body outputs != scan outputs"))
    stack_ys: list[tuple[bool, ...]] = []

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        x = [_check_slice(s, full) for s, full in zip(x, xs, strict=True)]
        outs = walk_closed(body, [*consts, *carry, *x])
        ys = outs[n_carry:]
        stack_ys.append(tuple(_opts_in(y) for y in ys))
        return outs[:n_carry], ys

    x_specs = [_slice_spec(x) for x in xs]
    to_dense = _settle(lambda c: abstract_call(step, c, x_specs)[0], carry, eqn)
    keep_ys = stack_ys[-1] if stack_ys else ()

    def body_fn(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        new_carry, ys = step(carry, x)
        ys = [y if k else dense(y, eqn, ys) for y, k in zip(ys, keep_ys, strict=True)]
        return _densify_at(new_carry, to_dense, eqn), ys

    new_carry, ys = jax.lax.scan(
        body_fn,
        _densify_at(carry, to_dense, eqn),
        xs,
        length=length,
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    for y, var in zip(ys, eqn.outvars[n_carry:], strict=True):
        if isinstance(y, ArrayValue):
            _check_aval(y, var.aval, "the stacked `ys`")
    return [*new_carry, *ys]


def _settle(
    abstract_step: Callable[[list[Any]], Sequence[Any]], carry: Sequence[Any], eqn: Any
) -> frozenset[int]:
    """The carry positions to materialise so one iteration preserves every carry's
    kind. Each pass only adds positions, so this ends after at most len(carry)+1."""
    to_dense: frozenset[int] = frozenset()
    for _ in range(len(carry) + 1):
        init = _densify_at(carry, to_dense, eqn)
        out = abstract_step(init)
        changed = {
            i
            for i, (before, after) in enumerate(
                zip(value_types(init), value_types(out), strict=True)
            )
            if i not in to_dense and before != after
        }
        if not changed:
            return to_dense
        to_dense = to_dense | changed
    raise QuaxBugError(_MSG_BUG.format(what="loop carry types did not settle"))


def _densify_at(vals: Sequence[Any], where: frozenset[int], eqn: Any) -> list[Any]:
    return [dense(x, eqn, vals) if i in where else x for i, x in enumerate(vals)]


def _slices_leafwise(x: Any, length: int) -> bool:
    """A value as `xs` is sliced leaf by leaf only if its class opts in and every
    leaf has the scanned axis."""
    if not _opts_in(x):
        return False
    leaves = jtu.tree_leaves(x)
    return bool(leaves) and all(
        len(shape) >= 1 and shape[0] == length
        for shape, _ in (leaf_type(leaf) for leaf in leaves)
    )


def _opts_in(x: Any) -> bool:
    return isinstance(x, ArrayValue) and bool(x.scan_leafwise())


def _slice_spec(x: Any) -> Any:
    def spec(leaf: Any) -> jax.ShapeDtypeStruct:
        shape, dtype = leaf_type(leaf)
        return jax.ShapeDtypeStruct(shape[1:], dtype)

    return jtu.tree_map(spec, x)


def _check_slice(piece: Any, full: Any) -> Any:
    if isinstance(piece, ArrayValue):
        aval = full.aval()
        expected = jax.core.ShapedArray(tuple(aval.shape)[1:], aval.dtype)
        _check_aval(piece, expected, "one slice along axis 0")
    return piece


def _check_aval(x: ArrayValue, expected: Any, what: str) -> None:
    got = x.aval()
    if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
        raise HandlerResultError(
            _MSG_BAD_SLICE.format(
                cls=type(x).__name__,
                what=what,
                got=describe_aval(got),
                expected=describe_aval(expected),
            )
        )
