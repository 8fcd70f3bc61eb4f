"""The exceptions quax raises, and every message template, filled by one formatter."""

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import equinox as eqx
import jax
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


class HandlerSignatureError(QuaxError, TypeError):
    """A handler's signature cannot take the operands or parameters JAX binds its
    primitive with."""


class QuaxBugError(QuaxError, RuntimeError):
    """An invariant of quax itself broke."""


class QuaxWarning(UserWarning):
    """A value class that works but is probably not what its author meant."""


_MSG_NO_HANDLER: Final = """\
quax: no way to run `{prim}` on operands ({types}) at {site}.
{reasons}
To fix: {fix}, handle `{prim}` in {first}.default, or make materialise() succeed."""

_MSG_FIX_METHOD: Final = "add `def {handler}(self, ...)` to {first}"

_MSG_FIX_ANYWHERE: Final = """\
add `@quax.handler("{handler}", operands="all")` to a staticmethod of {first} \
taking every operand"""

_MSG_CLASS_REASON: Final = """\
  {cls} defines no `{handler}` handler that accepted these operands \
(it defines: {defined}), {default}, and {cls}.materialise() raised:
    {err_type}: {err}"""

_MSG_CLASS_POSITION: Final = """\
  {cls} is at operand {positions} of `{prim}`, and {cls}.{handler} only ever sees \
a value at operand 0 (and `r{handler}` one at operand 1 of a binary primitive); \
a handler for a value at any position is registered with \
`@quax.handler("{handler}", operands="all")`. {cls} defines: {defined}; {default}; \
and {cls}.materialise() raised:
    {err_type}: {err}"""

_MSG_UNREACHABLE_OVERLOAD: Final = """\
quax: {cls}.{later} can never run as a `{name}` handler: {cls}.{first}, defined \
before it, handles `{name}` with no operand annotations, so it accepts every call \
first (a class's overloads are tried in definition order).
To fix: define the more specific overload (with annotations) first, or annotate \
the operands of {cls}.{first}."""

_MSG_HANDLER_NO_PARAMS: Final = """\
quax: {cls}.{attr} is a handler of the JAX primitive `{prim}` (by its name \
`{name}`), but it takes no `**params`, and JAX binds `{prim}` with parameters; \
calling it would fail.
To fix: {hint}."""

_MSG_HANDLER_BAD_KEYWORDS: Final = """\
quax: {where} cannot be called as the handler of `{prim}`: JAX binds `{prim}` \
with the parameters ({params}), and its signature does not match them ({unknown}).
To fix: add `**params` to the signature of {where} (and read what you need from \
it), or mark it `@quax.not_handler` if it is not meant to be a handler."""

_MSG_HANDLER_BAD_ARITY: Final = """\
quax: {where} cannot be called as the handler of `{prim}`: quax calls it with \
{n} operands ({how}), which its signature does not take.
To fix: take the operands as `*operands`, or as many positional parameters as \
`{prim}` has operands."""

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

_MSG_BAD_AVAL: Final = """\
quax: {cls}.aval() returned {got}, not an abstract value.
To fix: return `jax.core.ShapedArray(shape, dtype)` from {cls}.aval(): the shape and \
dtype this value stands for (what `materialise()` returns)."""

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


# quax's own frames are never "the user's line", in messages or in re-emitted
# equations' metadata.
source_info_util.register_exclusion(os.path.dirname(os.path.abspath(__file__)) + os.sep)

_SITES = threading.local()


@contextlib.contextmanager
def site(source_info: Any) -> Iterator[None]:
    """Record the equation being run, so an error inside a sub-jaxpr (whose equations
    carry JAX-internal tracebacks) can name the enclosing user line."""
    stack = _SITES.__dict__.setdefault("stack", [])
    stack.append(source_info)
    try:
        yield
    finally:
        stack.pop()


def format_site(source_info: Any) -> str:
    """The user's line that produced an equation, as "file:line:col (fn)"."""
    candidates = [source_info, *reversed(_SITES.__dict__.get("stack", []))]
    for info in candidates:
        if info is None:
            continue
        try:
            summary = source_info_util.summarize(info)
        except Exception:  # noqa: BLE001 -- a best-effort location must never raise
            continue
        if summary and not summary.startswith("<"):
            return summary
    return _calling_frame()


_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.dirname(os.path.abspath(m.__file__ or ""))) + os.sep
    for m in (contextlib, eqx, jax)
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _calling_frame() -> str:
    """The innermost frame of the Python stack outside quax, JAX, equinox and the
    standard library: where the quaxified function was called (JAX keeps only the
    innermost frames of an equation's traceback, which may all be library code)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_LIBRARY_DIRS) and not name.startswith("<frozen"):
            return f"{name}:{frame.f_lineno} ({frame.f_code.co_name}) (the call of the quaxified function)"
        frame = frame.f_back
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


_MSG_BAD_LEAF_SPECS: Final = """\
quax: {cls}.leaf_specs() must give one `PartitionSpec` per leaf of the value \
({n_leaves} leaves), but gave {got}.
To fix: return a pytree shaped like the value (e.g. `jax.tree.map(lambda _: spec, \
self)`) with a `jax.sharding.PartitionSpec` at every leaf, saying how the logical \
array's spec maps onto that leaf."""

_MSG_BAD_SHARD: Final = """\
quax: {what} {cls} value inside `shard_map` has aval {got}, but JAX expects \
{expected} there.
To fix: make {cls}.leaf_specs() split the leaves so that a shard of every leaf \
makes a shard of the value, and {cls}.shard_structure(shape) resize the static \
fields that depend on the shape."""


# -- strict mode (appended by helper trust) ---------------------------------------------


class MaterialiseError(QuaxError, TypeError):
    """In strict mode (`quax.strict()`, `quaxify(fn, materialise="error")`), quax
    would have materialised a value implicitly."""


class MaterialiseWarning(UserWarning):
    """In `materialise="warn"` mode, quax materialised a value implicitly."""


_MSG_MATERIALISE: Final = """\
quax: `{prim}` would materialise a {cls} into a dense array (operands: {types}), at
  {site}
Strict mode ("{mode}") reports every implicit materialisation.
To fix: give {cls} a handler `{handler}` (or a `default`), materialise the value
yourself before the call if dense is what you mean, or allow it for this function
with `quax.quaxify(fn, materialise="allow")`."""
