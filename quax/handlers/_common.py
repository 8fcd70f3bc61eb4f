"""Shared by the higher-order handlers: values <-> flat leaves, keys, materialising."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.tree_util as jtu

from .._dispatch import implicit_materialise
from .._errors import HandlerResultError, format_site
from .._values import ArrayValue, Value


#: Per operand: None for a plain array, else the value's treedef and leaf count.
OperandSpec = tuple[tuple[Any, int] | None, ...]


def flatten_operands(vals: Sequence[Any]) -> tuple[list[Any], OperandSpec]:
    """Values become their leaves (nested values included); arrays stay one leaf."""
    leaves: list[Any] = []
    spec: list[tuple[Any, int] | None] = []
    for x in vals:
        if isinstance(x, Value):
            xl, xt = jtu.tree_flatten(x)
            leaves.extend(xl)
            spec.append((xt, len(xl)))
        else:
            leaves.append(x)
            spec.append(None)
    return leaves, tuple(spec)


def unflatten_operands(leaves: Sequence[Any], spec: OperandSpec) -> list[Any]:
    out: list[Any] = []
    it = iter(leaves)
    for s in spec:
        if s is None:
            out.append(next(it))
        else:
            treedef, n = s
            out.append(jtu.tree_unflatten(treedef, [next(it) for _ in range(n)]))
    return out


def expand_per_operand(entries: Sequence[Any], spec: OperandSpec) -> tuple[Any, ...]:
    """A per-operand param (shardings, layouts, donation) repeated for each leaf."""
    out: list[Any] = []
    for entry, s in zip(entries, spec, strict=True):
        out.extend([entry] * (1 if s is None else s[1]))
    return tuple(out)


def aval_key(x: Any) -> Any:
    aval = jax.typeof(x)
    return (aval.shape, aval.dtype, getattr(aval, "weak_type", False))


def operands_key(leaves: Sequence[Any], spec: OperandSpec) -> Any:
    """A hashable key for operand types and avals: treedefs plus leaf avals."""
    return (spec, tuple(aval_key(x) for x in leaves))


def leaf_specs(leaves: Sequence[Any]) -> list[jax.ShapeDtypeStruct]:
    specs = []
    for x in leaves:
        aval = jax.typeof(x)
        specs.append(
            jax.ShapeDtypeStruct(
                aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False)
            )
        )
    return specs


def dense(x: Any, eqn: Any, operands: Sequence[Any] = ()) -> Any:
    """A value materialised for the higher-order equation `eqn` (checked against its
    aval; a refusal is a `NoHandlerError` naming `eqn`); anything else unchanged.
    `operands` are listed in the error message (default: `x` alone)."""
    return implicit_materialise(eqn, x, operands or (x,))


def dense_all(vals: Sequence[Any], eqn: Any) -> list[Any]:
    return [dense(x, eqn, vals) for x in vals]


def leaf_type(leaf: Any) -> tuple[tuple[int, ...], Any]:
    """`(shape, dtype)` of an array, a tracer or a `jax.ShapeDtypeStruct`."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return tuple(leaf.shape), leaf.dtype
    aval = jax.typeof(leaf)
    return tuple(aval.shape), aval.dtype


def value_type(x: Any) -> Any:
    """What must agree for a value to flow through a control-flow boundary unchanged:
    None for a plain array (JAX checks those itself), else the value's treedef (its
    class and static fields) and the shape and dtype of each leaf. Weak types are left
    to JAX, which promotes them across branches and iterations."""
    if not isinstance(x, Value):
        return None
    leaves, treedef = jtu.tree_flatten(x)
    return treedef, tuple(leaf_type(leaf) for leaf in leaves)


def value_types(vals: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(value_type(x) for x in vals)


def abstract_call(fn: Any, *args: Any) -> Any:
    """`fn(*args)` traced for its output types only (`jax.eval_shape`); values in the
    output come back as values whose leaves are `jax.ShapeDtypeStruct`s."""
    return jax.eval_shape(fn, *args)


# -- one kind for several: `ArrayValue.join` ------------------------------------------


def join_kinds(examples: Sequence[Any]) -> Any:
    """A value (with abstract leaves) of a kind every one of `examples` (the values
    and arrays that one output of a `cond`'s branches, or one loop carry, takes; any
    of them abstract) can be re-expressed in by `join`: `target.join(x)` then has
    `target`'s kind for each `x`. None if there is none: the values' classes do not
    `join`, or disagree."""
    target = next((x for x in examples if isinstance(x, ArrayValue)), None)
    if target is None or type(target).join is ArrayValue.join:
        return None  # the class keeps the default: nothing to ask
    for _ in range(len(examples) + 1):  # each change widens the kind: bounded
        if target is None:
            return None
        kind = value_type(target)
        for x in examples:
            joined = abstract_call(_join, target, x)
            if joined is None or type(joined) is not type(target):
                return None
            if value_type(joined) != kind:
                target = joined
                break
        else:
            return target
    return None


def _join(target: Any, x: Any) -> Any:
    return target.join(x)


def join_to(target: Any, x: Any, eqn: Any, operands: Sequence[Any] = ()) -> Any:
    """`x` in `target`'s kind (`join_kinds`'s result): `target.join(x)`, checked;
    with `target` None, `x` materialised (`dense`)."""
    if target is None:
        return dense(x, eqn, operands)
    joined = target.join(x)
    if value_type(joined) != value_type(target):
        raise HandlerResultError(
            _MSG_BAD_JOIN.format(
                cls=type(target).__name__,
                site=format_site(eqn.source_info),
                got=type(x).__name__,
            )
        )
    return joined


_MSG_BAD_JOIN = """\
quax: {cls}.join re-expressed a {got} as a value of another kind than it promised \
for the same inputs, at
  {site}
To fix: make {cls}.join depend only on the kinds (static fields, shapes, dtypes) of \
its operands, never on their values."""
