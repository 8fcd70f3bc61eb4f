"""Equinox's filter primitives (lineax's `linear_solve`, and any primitive made with
`equinox.internal.filter_primitive_def`/`create_vprim`) with values among the operands.

Such a primitive takes a whole pytree of arguments: its array leaves are the operands,
and everything else (the tree structure, closure-converted functions with their
jaxprs) is a parameter. Its rules (impl, JVP, transpose, batching) rebuild the pytree
and call methods on it: a lineax `FunctionLinearOperator` calls its function, a
`JacobianLinearOperator` differentiates its function at the user's `args`.

A value reaches these rules through those functions. So the pytree is rebuilt with
the values in place of their dense operands, every closure-converted function in it
(`eqx.filter_closure_convert`, which lineax and optimistix apply to every function
they are given) is replaced by one that runs under `quaxify`, and the primitive is
bound again on the values' leaves. The primitive keeps its own rules: a solve is
still differentiated implicitly by lineax, and transposed as lineax transposes it,
while every matrix-vector product inside runs through the value's handlers (LoRA:
`w·v + a·(b·v)`, never `w + a @ b`).

A value that a rule uses directly, not through a function (a lineax
`MatrixLinearOperator` holding it), cannot be walked: then the value is materialised
as for any primitive without a handler, and if it refuses, the error says why.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax.tree_util as jtu

from .._dispatch import implicit_materialise, materialise_all
from .._errors import QuaxError
from .._quaxify import quaxify
from .._values import Value, is_value
from .._walker import bind, eqn_context, register, register_matcher
from ._common import dense, join_kinds, join_to, value_type


# -- equinox's private names ----------------------------------------------------------
# equinox 0.13 has no public way to tell a filter primitive's equation apart, to find
# which of its `static` entries stand for operands, or to recognise a closure-converted
# function. Where these move, no equation matches and the default path (materialise)
# runs, as before this module existed.
try:
    from equinox._ad import (  # private: see above
        _ClosureConvert as _ClosureConvert,
        _TrivialClosureConvert as _TrivialClosureConvert,
    )
    from equinox.internal._loop.common import (  # private: see above
        select_if_vmap_p as _select_if_vmap_p,
    )
    from equinox.internal._nontraceable import (  # private: see above
        nonbatchable_p as _nonbatchable_p,
        nondifferentiable_backward_p as _nondifferentiable_backward_p,
        nontraceable_p as _nontraceable_p,
    )
    from equinox.internal._primitive import (  # private: see above
        Flatten as _Flatten,
        _missing_dynamic as _MISSING,
    )

    _CLOSURES: tuple[type, ...] = (_ClosureConvert, _TrivialClosureConvert)
except ImportError:  # pragma: no cover - a newer equinox
    _CLOSURES = ()
    _MISSING = _Flatten = _select_if_vmap_p = None
    _nonbatchable_p = _nondifferentiable_backward_p = _nontraceable_p = None


def is_filter_primitive(eqn: Any) -> bool:
    """Whether `eqn` binds a primitive made with equinox's filter rules."""
    params = eqn.params
    return (
        _Flatten is not None
        and set(params) == {"treedef", "static", "flatten"}
        and isinstance(params["flatten"], _Flatten)
    )


@register_matcher(is_filter_primitive)
def filter_primitive_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    args = _arguments(eqn, invals)
    walked = jtu.tree_map(
        lambda x: _Quaxified(x, eqn) if isinstance(x, _CLOSURES) else x,
        args,
        is_leaf=lambda x: isinstance(x, _CLOSURES) or is_value(x),
    )
    try:
        with eqn_context(eqn):
            out = eqxi.filter_primitive_bind(eqn.primitive, *walked)
    except QuaxError:
        raise
    except Exception as err:
        # A rule used a value directly: materialise, as without this handler.
        try:
            dense = materialise_all(eqn, invals)
        except QuaxError as refusal:
            refusal.add_note(_NOTE_DIRECT.format(err=f"{type(err).__name__}: {err}"))
            raise refusal from err
        return bind(eqn, dense)
    return jtu.tree_leaves(eqx.filter(out, eqx.is_array))


def _arguments(eqn: Any, invals: Sequence[Any]) -> tuple[Any, ...]:
    """The primitive's pytree of arguments, with the values where their dense
    operands were."""
    it = iter(invals)
    flat = [next(it) if x is _MISSING else x for x in eqn.params["static"]]
    return jtu.tree_unflatten(eqn.params["treedef"], flat)


class _Quaxified(eqx.Module):
    """A closure-converted function whose constants or arguments may hold values,
    run under `quaxify`; its outputs are plain arrays, as its callers expect."""

    fn: Any
    eqn: Any = eqx.field(static=True)

    @property
    def in_struct(self) -> Any:
        return self.fn.in_struct

    @property
    def out_struct(self) -> Any:
        return self.fn.out_struct

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A closure-converted function may take another as an argument (optimistix
        # passes the user's `fn` to its own): it is handed over as it was traced.
        args, kwargs = jtu.tree_map(
            lambda x: x.fn if isinstance(x, _Quaxified) else x,
            (args, kwargs),
            is_leaf=lambda x: isinstance(x, _Quaxified) or is_value(x),
        )
        out = quaxify(_call)(self.fn, args, kwargs)
        leaves, treedef = jtu.tree_flatten(out, is_leaf=is_value)
        leaves = [
            implicit_materialise(self.eqn, x, leaves) if isinstance(x, Value) else x
            for x in leaves
        ]
        return jtu.tree_unflatten(treedef, leaves)


def _call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


_NOTE_DIRECT = """\
quax walks the functions an equinox primitive closes over (a lineax \
`FunctionLinearOperator`'s function, an optimistix solver's `fn`), so a value used \
only inside them is never materialised; here the primitive's own rules used the \
value directly ({err}). Wrap the matrix in a function (e.g. \
`lineax.FunctionLinearOperator(lambda v: w @ v, ...)`) to keep it symbolic."""


# -- equinox's loops: `select_if_vmap` ------------------------------------------------


@register(_select_if_vmap_p)
def select_if_vmap_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    """`select_if_vmap(pred, new, old)` (equinox's loops keep a finished batch
    element's carry with it): `new` unless vmapped, else a select by a per-element
    predicate, so it applies leaf by leaf to two values of one kind (the two joined
    first if they differ, or materialised if they cannot be)."""
    pred, new, old = invals
    pred = dense(pred, eqn, invals)
    if not isinstance(new, Value) or value_type(new) != value_type(old):
        target = join_kinds([new, old])
        new, old = join_to(target, new, eqn, invals), join_to(target, old, eqn, invals)
    if not isinstance(new, Value):
        return bind(eqn, [pred, new, old])
    new_leaves, treedef = jtu.tree_flatten(new)
    leaves = [
        bind(eqn, [pred, x, y])[0]
        for x, y in zip(new_leaves, jtu.tree_leaves(old), strict=True)
    ]
    return [jtu.tree_unflatten(treedef, leaves)]


# -- equinox's checks: identities, leaf by leaf ---------------------------------------


@register(_nondifferentiable_backward_p, _nontraceable_p, _nonbatchable_p)
def identity_check_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    """`nondifferentiable_backward`, `nontraceable`, `nonbatchable`: the identity,
    with an error if a cotangent (a trace, a batch axis) reaches it; applied to
    every leaf of a value, the value keeps its kind and each leaf its check."""
    (operand,) = invals
    return [jtu.tree_map(lambda leaf: bind(eqn, [leaf])[0], operand)]
