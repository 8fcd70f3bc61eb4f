"""The dispatch protocol: which method of which value runs a primitive.

For one equation whose operands include at least one `Value`:

1. Candidates: the `Value` operands, one per class, left to right, except that a class
   comes before any of its base classes (Python's rule for `__radd__`; NEP 13).
2. Handler name: `handler_name(primitive.name)`. The candidate at operand 0 is asked
   `xs[0].name(*xs[1:], **params)`; when the equation has exactly two operands the
   candidate at operand 1 is asked the reflected `xs[1].rname(xs[0], **params)`. A
   candidate at any other position is reached only through `default` (step 5).
3. Lookup by MRO: plain attribute lookup on the class; only functions count.
4. Declining: a handler returns `NotImplemented`, or its parameter annotations reject
   the operands (checked with beartype). A result violating its return annotation is
   a `HandlerResultError`.
5. Default: each candidate class overriding `default(primitive, operands, params)` is
   asked in order. If none takes the equation, every value is materialised and the
   primitive is bound as usual; if a `materialise()` raises, `NoHandlerError`.
6. Check: each result must have the shape and dtype JAX traced for that output.
"""

import functools as ft
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import jax
from beartype.door import is_bearable

from . import _compat
from ._errors import (
    _MSG_BAD_RESULT_AVAL,
    _MSG_BAD_RESULT_COUNT,
    _MSG_BAD_RETURN_ANNOTATION,
    _MSG_CLASS_REASON,
    _MSG_NO_HANDLER,
    HandlerResultError,
    NoHandlerError,
    describe_aval,
    format_site,
    list_names,
    type_names,
)
from ._strict import on_materialise
from ._values import (
    Value,
    aval_of,
    handler_name,
    materialise,
    primitive_handler_names,
)


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
    """The function `cls.name`, found by MRO, or None if it is not a function."""
    if name.startswith("_"):
        return None
    fn = getattr(cls, name, None)
    if inspect.isfunction(fn):
        return fn
    return None


@ft.cache
def defined_handlers(cls: type) -> tuple[str, ...]:
    """The handler methods a class defines (itself or inherited), for messages."""
    prims = primitive_handler_names()
    return tuple(
        sorted(n for n in dir(cls) if n in prims and lookup_handler(cls, n) is not None)
    )


# -- annotations ----------------------------------------------------------------------

_NO_HINT = object()


@ft.cache
def _signature_hints(cls: type, fn: Callable) -> tuple[tuple[Any, ...], Any, Any]:
    """`(positional operand hints after self, *args hint, return hint)`; `_NO_HINT`
    where there is no annotation. String annotations may name the class or any of its
    bases (`-> "Zero"`), even when the class is local to a function."""
    localns = {c.__name__: c for c in reversed(cls.__mro__)}
    try:
        hints = typing.get_type_hints(fn, localns=localns, include_extras=True)
    except Exception:  # noqa: BLE001 -- unresolvable names: keep what is not a string
        raw = getattr(fn, "__annotations__", {})
        hints = {k: v for k, v in raw.items() if not isinstance(v, str)}
    sig = inspect.signature(fn)
    positional: list[Any] = []
    vararg: Any = _NO_HINT
    for i, param in enumerate(sig.parameters.values()):
        if i == 0:
            continue  # self
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional.append(hints.get(param.name, _NO_HINT))
        elif param.kind is param.VAR_POSITIONAL:
            vararg = hints.get(param.name, _NO_HINT)
    return tuple(positional), vararg, hints.get("return", _NO_HINT)


def _accepts(cls: type, fn: Callable, operands: Sequence[Any]) -> bool:
    positional, vararg, _ = _signature_hints(cls, fn)
    for i, x in enumerate(operands):
        hint = positional[i] if i < len(positional) else vararg
        if hint is not _NO_HINT and not is_bearable(x, hint):
            return False
    return True


def _check_return(cls: type, fn: Callable, where: str, result: Any, eqn: Any) -> None:
    hint = _signature_hints(cls, fn)[2]
    if hint is _NO_HINT or is_bearable(result, hint):
        return
    raise HandlerResultError(
        _MSG_BAD_RETURN_ANNOTATION.format(
            where=where,
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


def try_handlers(eqn: Any, operands: Sequence[Any], params: dict[str, Any]) -> Any:
    """Steps 1-4: ask each candidate's handler method. Returns the handler's result, or
    `NotImplemented` if every candidate declined."""
    name = handler_name(eqn.primitive.name)
    binary = len(operands) == 2
    for cls, pos in candidates(operands):
        if pos == 0:
            fn, args, method = lookup_handler(cls, name), operands, name
        elif pos == 1 and binary:
            method = "r" + name
            fn, args = lookup_handler(cls, method), (operands[1], operands[0])
        else:
            continue
        if fn is None or not _accepts(cls, fn, args[1:]):
            continue
        result = fn(*args, **params)
        if result is NotImplemented:
            continue
        where = f"{cls.__name__}.{method}"
        _check_return(cls, fn, where, result, eqn)
        return where, result
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
    reasons = []
    for cls, _ in candidates(invals):
        if cls is not type(failed):
            continue
        default = (
            f"{cls.__name__}.default declined"
            if _overrides_default(cls)
            else f"{cls.__name__} does not override `default`"
        )
        reasons.append(
            _MSG_CLASS_REASON.format(
                cls=cls.__name__,
                handler=name,
                defined=list_names(defined_handlers(cls)),
                default=default,
                err_type=type(err).__name__,
                err=str(err).strip().replace("\n", "\n    "),
            )
        )
    return _MSG_NO_HANDLER.format(
        prim=eqn.primitive.name,
        types=type_names(invals),
        site=format_site(eqn.source_info),
        reasons="\n".join(reasons),
        handler=name,
        first=type(failed).__name__,
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
