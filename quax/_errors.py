"""The exceptions quax raises, and every message template, filled by one formatter."""

from collections.abc import Iterable, Sequence
from typing import Any, Final

import jax.extend.source_info_util as source_info_util


class QuaxError(Exception):
    """Base class of every error quax raises on purpose."""


class NoHandlerError(QuaxError, NotImplementedError):
    """No handler, `default` or `materialise()` could run a primitive on its operands."""


class HandlerResultError(QuaxError, TypeError):
    """A handler, `default` or `materialise()` returned something of the wrong type,
    shape or dtype."""


class QuaxifyTypeError(QuaxError, TypeError):
    """`quaxify` was used on something it cannot wrap."""


class QuaxBugError(QuaxError, RuntimeError):
    """An invariant of quax itself broke."""


_MSG_NO_HANDLER: Final = """\
quax: no way to run `{prim}` on operands ({types}) at {site}.
{reasons}
To fix: add `def {handler}(self, ...)` to {first}, handle `{prim}` in \
{first}.default, or make materialise() succeed."""

_MSG_CLASS_REASON: Final = """\
  {cls} defines no `{handler}` handler that accepted these operands \
(it defines: {defined}), {default}, and {cls}.materialise() raised:
    {err_type}: {err}"""

_MSG_BAD_RESULT_AVAL: Final = """\
quax: {where} returned {got} for output {index} of `{prim}` at {site}, but JAX \
expects {expected} there (the shape and dtype JAX computed when tracing).
To fix: make {where} return a result of shape {shape} and dtype {dtype}; \
return `NotImplemented` to decline instead."""

_MSG_BAD_RESULT_COUNT: Final = """\
quax: {where} returned {got} results for `{prim}` at {site}, but the primitive has \
{expected} outputs.
To fix: return {expected_desc}."""

_MSG_BAD_RETURN_ANNOTATION: Final = """\
quax: {where} returned a value of type {got} for `{prim}` at {site}, which violates \
its return annotation `{annotation}`.
To fix: return a value matching the annotation, fix the annotation, or return \
`NotImplemented` to decline."""

_MSG_BAD_MATERIALISE: Final = """\
quax: {cls}.materialise() returned {got}, but {cls}.aval() says {expected}.
To fix: make `aval()` and `materialise()` agree on shape and dtype."""

_MSG_NOT_CALLABLE: Final = """\
quax: `quaxify` expects a callable (a function, a bound method or an equinox Module \
with `__call__`), but got {got!r} of type {type}.
To fix: pass the function itself, e.g. `quax.quaxify(f)(x)`, not `quax.quaxify(f(x))`."""

_MSG_PRIMITIVE_ATTRIBUTE: Final = """\
quax: {cls} defines {kind} `{attr}`, but `{attr}` is the handler name of the JAX \
primitive `{prim}`; quax would call it as a handler.
To fix: rename it (e.g. `{attr}_` or `_{attr}`), or make it a method if it is meant \
to handle `{prim}`."""

_MSG_BUG: Final = """\
quax: internal error: {what}. This is a bug in quax; please report it with the code \
that triggered it."""


def format_site(source_info: Any) -> str:
    """The user's line that produced an equation, as "file:line:col (fn)"."""
    if source_info is None:
        return "<unknown location>"
    try:
        return source_info_util.summarize(source_info)
    except Exception:  # noqa: BLE001 -- a best-effort location must never raise
        return "<unknown location>"


def type_names(operands: Iterable[Any]) -> str:
    return ", ".join(_short_type(x) for x in operands)


def _short_type(x: Any) -> str:
    from ._values import Value  # _values imports _errors; this is the only way back

    if isinstance(x, Value):
        return type(x).__name__
    return "Array"


def list_names(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def describe_aval(aval: Any) -> str:
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return f"{aval!r}"
    return f"{dtype}{list(shape)}"
