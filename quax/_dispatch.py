"""The dispatch protocol (version 2): which handler of which value runs a primitive.

For one equation whose operands include at least one `Value`:

1. Candidates: the `Value` operands, one per class, left to right, except that a class
   comes before any of its base classes (Python's rule for `__radd__`; NEP 13).
2. Handler name: `handler_name(primitive.name)`. For each candidate in turn:
   a. positional handlers: a candidate at operand 0 is asked its handlers registered
      under `name` as `h(xs[0], *xs[1:], **params)`; when the equation has exactly two
      operands, a candidate at operand 1 is asked those under the reflected `rname`
      as `h(xs[1], xs[0], **params)`;
   b. then its any-position handlers (`@quax.handler(name, operands="all")`) as
      `h(*xs, **params)`, wherever its values are (higher-order primitives included:
      the walker asks this before quax's own handler for `scan`, `cond`, `jit`, ...).
3. Overloads: a class's handlers for one name come from its handler table
   (`quax/_table.py`), built once when the class is created. A method named after the
   primitive (an implicit handler) and `@quax.handler(name)` functions are overloads
   at their definition position; the class's own overloads come first, in definition
   order, then each base's in MRO order; an attribute redefined by a subclass replaces
   the base's (Python's attribute lookup). The first overload that accepts the
   operands and does not decline wins.
4. Declining: a handler returns `NotImplemented`, or its operand annotations reject
   the operands (checked with beartype). A result violating its return annotation is
   a `HandlerResultError`; a signature that cannot take the operands or the
   primitive's parameters is a `HandlerSignatureError`.
5. Default: each candidate class overriding `default(primitive, operands, params)` is
   asked in order. If none takes the equation, every value is materialised and the
   primitive is bound as usual; if a `materialise()` raises, `NoHandlerError`.
6. Check: each result must have the shape and dtype JAX traced for that output.

Why this order. Definition order is the order a reader sees in the class body, which
is the type's rule table: specific overloads go first and a catch-all last, as in a
`match` statement (an unannotated overload followed by another of the same name in
the same class is rejected when the class is created, since it would shadow it).
Subclass before bases is Python's own rule for methods and for `__radd__`: a subclass
refines its base, so its rules are asked first and the base's remain as a fallback
unless the subclass redefines the attribute, exactly as a method override. Positional
handlers come before any-position ones because they are the more specific statement
("I am operand 0"). The table is computed at class creation, so a call costs one dict
lookup per candidate and no MRO walk, and mistakes surface at the `class` line.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
from beartype.door import is_bearable

from . import _compat
from ._errors import (
    _MSG_BAD_RESULT_AVAL,
    _MSG_BAD_RESULT_COUNT,
    _MSG_BAD_RETURN_ANNOTATION,
    _MSG_CLASS_POSITION,
    _MSG_CLASS_REASON,
    _MSG_FIX_ANYWHERE,
    _MSG_FIX_METHOD,
    _MSG_NO_HANDLER,
    HandlerResultError,
    NoHandlerError,
    describe_aval,
    format_site,
    list_names,
    type_names,
)
from ._strict import on_materialise
from ._table import _NO_HINT, Handler, handler_table
from ._values import Value, aval_of, handler_name, materialise


def candidates(operands: Sequence[Any]) -> list[tuple[type, int]]:
    """The `(class, first operand position)` of each value class among `operands`,
    ordered left to right except that a subclass comes before its base classes."""
    out: list[tuple[type, int]] = []
    for pos, x in enumerate(operands):
        if not isinstance(x, Value):
            continue
        cls = type(x)
        if any(c is cls for c, _ in out):
            continue
        # Insert before the first earlier candidate this class derives from.
        for i, (other, _) in enumerate(out):
            if issubclass(cls, other):
                out.insert(i, (cls, pos))
                break
        else:
            out.append((cls, pos))
    return out


def lookup_handler(cls: type, name: str) -> Callable | None:
    """The first handler of `cls` registered under `name` for a value at operand 0
    (or 1, for a reflected name), or None."""
    overloads = handler_table(cls).positional.get(name)
    return overloads[0].fn if overloads else None


def defined_handlers(cls: type) -> list[str]:
    """The handler names a class defines (itself or inherited), for messages."""
    return handler_table(cls).names()


def _check_return(cls: type, h: Handler, result: Any, eqn: Any) -> None:
    hint = h.hints()[2]
    if hint is _NO_HINT or is_bearable(result, hint):
        return
    raise HandlerResultError(
        _MSG_BAD_RETURN_ANNOTATION.format(
            where=f"{cls.__name__}.{h.attr}",
            got=type(result).__name__,
            prim=eqn.primitive.name,
            site=format_site(eqn.source_info),
            annotation=getattr(hint, "__name__", repr(hint)),
        )
    )


# -- the protocol -----------------------------------------------------------------------


def handler_operands(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Operands as handlers see them: literals (numpy values, or Python scalars such
    as `TypedFloat`) and numpy constants become *concrete* JAX arrays of the traced
    dtype and weak type, even inside a trace, so a handler can test `other == 0`;
    values and JAX arrays (tracers included) are passed as they are."""
    out = []
    for var, x in zip(eqn.invars, invals, strict=True):
        if not isinstance(x, Value | jax.Array):
            aval = var.aval
            with jax.ensure_compile_time_eval():
                x = _compat.weak_scalar_like(
                    x, aval.dtype, getattr(aval, "weak_type", False)
                )
        out.append(x)
    return out


_NAMES: dict[str, str] = {}


def try_handlers(eqn: Any, operands: Sequence[Any], params: dict[str, Any]) -> Any:
    """Steps 1-4: ask each candidate's handlers. Returns `(where, result)`, or
    `NotImplemented` if every candidate declined."""
    prim = eqn.primitive.name
    name = _NAMES.get(prim)
    if name is None:
        name = _NAMES[prim] = handler_name(prim)
    binary = len(operands) == 2
    for cls, pos in candidates(operands):
        table = handler_table(cls)
        if pos == 0:
            overloads, args = table.positional.get(name, ()), operands
        elif pos == 1 and binary:
            overloads = table.positional.get("r" + name, ())
            args = (operands[1], operands[0])
        else:
            overloads, args = (), operands
        anywhere = table.anywhere.get(name, ())
        for h in (*overloads, *anywhere) if anywhere else overloads:
            call_args = operands if h.all_operands else args
            if h.annotated and not h.accepts(call_args):
                continue
            if not h.var_kw or not h.min_args <= len(call_args) <= h.max_args:
                h.check_call(cls, prim, len(call_args), params)
            result = h.fn(*call_args, **params)
            if result is NotImplemented:
                continue
            _check_return(cls, h, result, eqn)
            return f"{cls.__name__}.{h.attr}", result
    return NotImplemented


def _overrides_default(cls: type) -> bool:
    return getattr(cls, "default", None) is not Value.__dict__["default"].__func__


def try_defaults(eqn: Any, operands: Sequence[Any], bind_params: dict[str, Any]) -> Any:
    """Step 5a: ask each candidate class that overrides `default`."""
    for cls, _ in candidates(operands):
        if not _overrides_default(cls):
            continue
        result = cls.default(eqn.primitive, tuple(operands), bind_params)
        if result is not NotImplemented:
            return f"{cls.__name__}.default", result
    return NotImplemented


def materialise_all(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Step 5b: every value materialised; a refusal becomes a `NoHandlerError`."""
    return [implicit_materialise(eqn, x, invals) for x in invals]


def implicit_materialise(eqn: Any, x: Any, operands: Sequence[Any]) -> Any:
    """The one place quax turns a value into an array on its own initiative, for the
    equation `eqn` (whose operands are `operands`): every handler that materialises
    goes through here. Anything but a value is returned unchanged. A refusal from
    `materialise()` becomes a `NoHandlerError` naming the primitive, the operand types
    and the user's line."""
    if not isinstance(x, Value):
        return x
    on_materialise(eqn, x, operands)  # strict mode and `quax.explain`
    try:
        return materialise(x)
    except HandlerResultError:
        raise
    except Exception as err:
        raise NoHandlerError(_no_handler_message(eqn, operands, x, err)) from err


def _no_handler_message(eqn: Any, invals: Sequence[Any], failed: Value, err: Exception):
    name = handler_name(eqn.primitive.name)
    cls = type(failed)
    positions = [i for i, x in enumerate(invals) if type(x) is cls]
    positional = 0 in positions or (1 in positions and len(invals) == 2)
    default = (
        f"{cls.__name__}.default declined"
        if _overrides_default(cls)
        else f"{cls.__name__} does not override `default`"
    )
    fields = dict(
        cls=cls.__name__,
        prim=eqn.primitive.name,
        handler=name,
        defined=list_names(defined_handlers(cls)),
        default=default,
        err_type=type(err).__name__,
        err=str(err).strip().replace("\n", "\n    "),
    )
    if positional or name in handler_table(cls).anywhere:
        reason = _MSG_CLASS_REASON.format(**fields)
        fix = _MSG_FIX_METHOD.format(handler=name, first=cls.__name__)
    else:
        where = ", ".join(str(i) for i in positions)
        reason = _MSG_CLASS_POSITION.format(
            positions=("position " if len(positions) == 1 else "positions ") + where,
            **fields,
        )
        fix = _MSG_FIX_ANYWHERE.format(handler=name, first=cls.__name__)
    return _MSG_NO_HANDLER.format(
        prim=eqn.primitive.name,
        types=type_names(invals),
        site=format_site(eqn.source_info),
        reasons=reason,
        fix=fix,
        first=cls.__name__,
    )


def check_results(eqn: Any, where: str, result: Any) -> list[Any]:
    """Step 6: the results as a list, each checked against the traced output aval."""
    prim = eqn.primitive
    n_out = len(eqn.outvars)
    if prim.multiple_results:
        if not isinstance(result, list | tuple) or len(result) != n_out:
            got = len(result) if isinstance(result, list | tuple) else "a non-sequence"
            raise HandlerResultError(
                _MSG_BAD_RESULT_COUNT.format(
                    where=where,
                    got=got,
                    prim=prim.name,
                    site=format_site(eqn.source_info),
                    expected=n_out,
                    expected_desc=f"a list or tuple of {n_out} results",
                )
            )
        results = list(result)
    else:
        results = [result]
    for i, (var, out) in enumerate(zip(eqn.outvars, results, strict=True)):
        got = _aval_of(out)
        expected = var.aval
        if got is None or not _shape_dtype_match(got, expected):
            raise HandlerResultError(
                _MSG_BAD_RESULT_AVAL.format(
                    where=where,
                    got=describe_aval(got) if got is not None else type(out).__name__,
                    index=i,
                    prim=prim.name,
                    site=format_site(eqn.source_info),
                    expected=describe_aval(expected),
                    shape=tuple(expected.shape),
                    dtype=expected.dtype,
                )
            )
    return results


def _aval_of(x: Any) -> Any:
    if isinstance(x, Value):
        return aval_of(x)
    try:
        return jax.typeof(x)
    except TypeError:
        return None


def _shape_dtype_match(got: Any, expected: Any) -> bool:
    if not hasattr(expected, "shape"):  # tokens and other non-array avals
        return type(got) is type(expected)
    return (
        hasattr(got, "shape")
        and tuple(got.shape) == tuple(expected.shape)
        and got.dtype == expected.dtype
    )
