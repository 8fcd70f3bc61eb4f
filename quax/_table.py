"""The handler table: which functions of a value class handle which primitive.

Built once per class when it is created (`Value.__init_subclass__`), from the class
body and its bases: the dispatch hot path reads it with one dict lookup.
"""

import functools as ft
import inspect
import keyword
import os
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, TypeVar

import jax
import jax.extend.core as jexc
from beartype.door import is_bearable

from ._errors import (
    _MSG_HANDLER_BAD_ARITY,
    _MSG_HANDLER_BAD_KEYWORDS,
    _MSG_HANDLER_NO_PARAMS,
    _MSG_UNREACHABLE_OVERLOAD,
    HandlerSignatureError,
    QuaxWarning,
)


# -- handler names ----------------------------------------------------------------------


def handler_name(prim_name: str) -> str:
    """The method name that handles the primitive called `prim_name`.

    `eqn.primitive.name` as an identifier: hyphens become underscores (`scatter-add` ->
    `scatter_add`) and Python keywords get a trailing underscore (`and` -> `and_`), as
    in the `operator` module. The reflected handler is `"r" + handler_name(...)`.
    """
    name = prim_name.replace("-", "_")
    return name + "_" if keyword.iskeyword(name) else name


@ft.cache
def jax_primitives() -> dict[str, jexc.Primitive]:
    """The primitives JAX exports (in `jax.lax` and `jax.extend.core.primitives`), by
    handler name. Computed, never kept by hand."""
    prims: dict[str, jexc.Primitive] = {}
    for module in (jax.lax, jexc.primitives):
        for attr in dir(module):
            prim = getattr(module, attr, None)
            if isinstance(prim, jexc.Primitive):
                prims.setdefault(handler_name(prim.name), prim)
    return prims


@ft.cache
def primitive_handler_names() -> dict[str, str]:
    """Every handler name of the primitives JAX exports, forward and reflected,
    mapped to the primitive's name."""
    names: dict[str, str] = {}
    for name, prim in jax_primitives().items():
        names.setdefault(name, prim.name)
    for name, prim in jax_primitives().items():
        names.setdefault("r" + name, prim.name)
    return names


def is_reflected_name(name: str) -> bool:
    """Whether `name` is the reflected handler name (`rmul`) of a JAX primitive."""
    prim = primitive_handler_names().get(name)
    return prim is not None and handler_name(prim) != name


#: Primitives that JAX's own functions bind with no parameters (`x + y` binds `add`
#: with none; `x * y` binds `mul` with `out_dtype`), so a handler for them needs no
#: `**params`. tests/test_protocol_v2.py checks each against a traced program.
PARAMLESS: Final = frozenset(
    "add sub div rem pow max min atan2 nextafter and or xor not eq ne lt le gt ge neg "
    "abs sign floor ceil is_finite select_n clamp shift_left shift_right_logical "
    "shift_right_arithmetic population_count clz real imag complex square "
    "stop_gradient copy erf erfc erf_inv lgamma digamma igamma igammac polygamma zeta "
    "bessel_i0e bessel_i1e add_any random_fold_in random_unwrap".split()
)


#: Methods of the value protocol itself (`ArrayValue`'s hooks), never implicit
#: handlers even where JAX has a primitive of the same name (`stack`, `unstack`): a
#: type that wants to handle those primitives registers a method with
#: `@quax.handler("stack")`.
HOOKS: Final = frozenset(
    "aval materialise default scan_leafwise stack unstack leaf_specs "
    "shard_structure".split()
)


# -- marking functions --------------------------------------------------------------------

_HANDLER_MARK: Final = "__quax_handler__"
_NOT_HANDLER_MARK: Final = "__quax_not_handler__"

_F = TypeVar("_F")


def handler(*names: str, operands: Literal["self", "all"] = "self") -> Callable:
    """Register a function of a `quax.Value` class body as the handler of the
    primitives whose handler names are `names`, whatever the function is called.

    **Arguments:**

    - `names`: handler names (`quax.handler_name(primitive.name)`: `"mul"`,
      `"dot_general"`, `"and_"`; `"rmul"` for the reflected handler of a binary
      primitive).
    - `operands`: `"self"` (the default) for a method called like an implicit
      handler, `method(value, *other_operands, **params)` for a value at operand 0
      (operand 1 for a reflected name, with the other operand after it). `"all"` for
      a function with no `self` (it becomes a staticmethod) called with every operand
      in the primitive's order, `fn(*operands, **params)`, whenever a value of the
      class is among the operands, at any position; also for higher-order
      primitives (`"scan"`, `"cond"`, `"while_"`, `"jit"`), before quax's own
      handler for them.

    Several handlers of one class may share a name (overloads): they are tried in
    definition order, a subclass's before its bases', and the first whose
    annotations accept the operands and which does not return `NotImplemented` wins.
    A method named after a primitive is an overload too, where it is defined; a
    decorated function is registered under the given names only, and a subclass
    method overriding it (same attribute name, no decorator) takes its place.

    **Returns:**

    A decorator returning the function (wrapped in `staticmethod` for
    `operands="all"`).
    """
    if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise TypeError(
            "quax: `quax.handler(*names)` takes one or more handler names as strings "
            f"(e.g. `quax.handler('mul', 'rmul')`), got {names!r}."
        )
    if operands not in ("self", "all"):
        raise ValueError(
            f"quax: `quax.handler(..., operands=...)` is 'self' or 'all', got {operands!r}."
        )
    if operands == "all":
        reflected = [n for n in names if is_reflected_name(n)]
        if reflected:
            raise ValueError(
                f"quax: `{reflected[0]}` is a reflected handler name; an "
                "`operands='all'` handler sees every operand in order, so register it "
                f"under `{reflected[0][1:]}` instead."
            )

    def decorator(fn: _F) -> _F:
        func = fn.__func__ if isinstance(fn, staticmethod) else fn
        if not inspect.isfunction(func):
            raise TypeError(
                f"quax: `quax.handler` decorates a function, got {type(fn).__name__}."
            )
        setattr(func, _HANDLER_MARK, (tuple(dict.fromkeys(names)), operands))
        if operands == "all" and not isinstance(fn, staticmethod):
            return typing.cast(_F, staticmethod(func))
        return fn

    return decorator


def not_handler(fn: _F) -> _F:
    """Mark a method (or staticmethod, classmethod, property) whose name happens to
    be a primitive's handler name (`split`, `sort`, `copy`) as a plain method: quax
    never calls it as a handler and does not list it among the class's handlers."""
    target: Any = fn
    if isinstance(fn, staticmethod | classmethod):
        target = fn.__func__
    elif isinstance(fn, property):
        target = fn.fget
    try:
        setattr(target, _NOT_HANDLER_MARK, True)
    except (AttributeError, TypeError) as err:
        raise TypeError(
            "quax: `quax.not_handler` decorates a function, staticmethod, classmethod "
            f"or property, got {type(fn).__name__}."
        ) from err
    return fn


def is_not_handler(obj: Any) -> bool:
    """Whether a class attribute was marked with `quax.not_handler`."""
    target = obj
    if isinstance(obj, staticmethod | classmethod):
        target = obj.__func__
    elif isinstance(obj, property):
        target = obj.fget
    return bool(getattr(target, _NOT_HANDLER_MARK, False))


# -- one handler ------------------------------------------------------------------------

_NO_HINT: Final = object()


class Handler:
    """One handler function of a class, with what dispatch needs precomputed."""

    __slots__ = (
        "fn",
        "attr",
        "owner",
        "all_operands",
        "annotated",
        "var_kw",
        "kw_names",
        "required_kw",
        "names_keywords",
        "positional",
        "min_args",
        "max_args",
        "_hints",
    )

    def __init__(self, fn: Callable, attr: str, owner: type, all_operands: bool):
        self.fn = fn
        self.attr = attr
        self.owner = owner
        self.all_operands = all_operands
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        positional = [
            p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        varargs = [p for p in params if p.kind is p.VAR_POSITIONAL]
        self.var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        self.kw_names = frozenset(
            p.name
            for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        self.names_keywords = any(p.kind is p.KEYWORD_ONLY for p in params)
        self.required_kw = frozenset(
            p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty
        )
        # Per positional parameter: its name, whether it is required, and whether a
        # keyword may fill it (`random_bits(self, bit_width, shape)` takes its two
        # parameters from `bit_width=`, `shape=`).
        self.positional = tuple(
            (p.name, p.default is p.empty, p.kind is p.POSITIONAL_OR_KEYWORD)
            for p in positional
        )
        self.min_args = sum(p.default is p.empty for p in positional)
        self.max_args = sys.maxsize if varargs else len(positional)
        skip = 0 if all_operands else 1  # `self` is never checked
        raw = getattr(fn, "__annotations__", {})
        operand_params = [p.name for p in positional[skip:]] + [p.name for p in varargs]
        self.annotated = any(name in raw for name in operand_params)
        self._hints: tuple[tuple[Any, ...], Any, Any] | None = None

    def hints(self) -> tuple[tuple[Any, ...], Any, Any]:
        """`(operand hints, *args hint, return hint)`, `_NO_HINT` where there is no
        annotation, resolved on first use (so annotations may name classes defined
        after this one). String annotations may name the class or any of its bases,
        even when the class is local to a function."""
        if self._hints is None:
            self._hints = _resolve_hints(self.fn, self.owner, self.all_operands)
        return self._hints

    def accepts(self, operands: Sequence[Any]) -> bool:
        """Whether the operand annotations accept `operands` (beartype)."""
        positional, vararg, _ = self.hints()
        start = 0 if self.all_operands else 1
        for i in range(start, len(operands)):
            j = i - start
            hint = positional[j] if j < len(positional) else vararg
            if hint is not _NO_HINT and not is_bearable(operands[i], hint):
                return False
        return True

    def check_call(self, cls: type, prim: str, n_args: int, params: Any) -> None:
        """Raise `HandlerSignatureError` if the function cannot be called with
        `n_args` operands and the keyword arguments `params`."""
        unfilled = any(
            required and not (by_keyword and name in params)
            for name, required, by_keyword in self.positional[n_args:]
        )
        if unfilled or n_args > self.max_args:
            raise HandlerSignatureError(
                _MSG_HANDLER_BAD_ARITY.format(
                    where=f"{cls.__name__}.{self.attr}",
                    prim=prim,
                    n=n_args,
                    how="every operand" if self.all_operands else "`self` first",
                )
            )
        if self.var_kw:
            return
        unknown = [k for k in params if k not in self.kw_names]
        missing = [k for k in self.required_kw if k not in params]
        if unknown or missing:
            raise HandlerSignatureError(
                _MSG_HANDLER_BAD_KEYWORDS.format(
                    where=f"{cls.__name__}.{self.attr}",
                    prim=prim,
                    params=", ".join(sorted(params)) or "none",
                    unknown=", ".join(unknown or missing),
                )
            )


def _resolve_hints(
    fn: Callable, owner: type, all_operands: bool
) -> tuple[tuple[Any, ...], Any, Any]:
    localns = {c.__name__: c for c in reversed(owner.__mro__)}
    try:
        hints = typing.get_type_hints(fn, localns=localns, include_extras=True)
    except Exception:  # noqa: BLE001 -- unresolvable names: keep what is not a string
        raw = getattr(fn, "__annotations__", {})
        hints = {k: v for k, v in raw.items() if not isinstance(v, str)}
    positional: list[Any] = []
    vararg: Any = _NO_HINT
    params = list(inspect.signature(fn).parameters.values())
    for param in params[0 if all_operands else 1 :]:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional.append(hints.get(param.name, _NO_HINT))
        elif param.kind is param.VAR_POSITIONAL:
            vararg = hints.get(param.name, _NO_HINT)
    return tuple(positional), vararg, hints.get("return", _NO_HINT)


# -- the table ------------------------------------------------------------------------------


class HandlerTable:
    """A class's handlers: `positional[name]` for a value at operand 0 (operand 1 for
    a reflected name), `anywhere[name]` for `operands="all"` handlers; each a tuple of
    overloads in the order they are tried."""

    __slots__ = ("positional", "anywhere")

    def __init__(
        self,
        positional: dict[str, tuple[Handler, ...]],
        anywhere: dict[str, tuple[Handler, ...]],
    ):
        self.positional = positional
        self.anywhere = anywhere

    def names(self) -> list[str]:
        """Every handler name, for messages (`select_n (operands='all')`)."""
        return sorted(self.positional) + sorted(
            f"{n} (operands='all')" for n in self.anywhere
        )


_TABLES: dict[type, HandlerTable] = {}


def handler_table(cls: type) -> HandlerTable:
    """The handler table of a value class, built when the class was created (or now,
    for a class whose `__init_subclass__` did not reach `Value`'s)."""
    try:
        return _TABLES[cls]
    except KeyError:
        return build_table(cls)


def _own_handlers(
    cls: type,
) -> list[tuple[str, Callable, str, bool]]:
    """`(handler name, function, attribute, all operands?)` for each handler defined
    in the body of `cls` itself, in definition order."""
    prims = primitive_handler_names()
    out: list[tuple[str, Callable, str, bool]] = []
    for attr, obj in cls.__dict__.items():
        func = obj.__func__ if isinstance(obj, staticmethod) else obj
        if not inspect.isfunction(func) or getattr(func, _NOT_HANDLER_MARK, False):
            continue
        mark = getattr(func, _HANDLER_MARK, None)
        if mark is None and not attr.startswith("__"):
            mark = _inherited_mark(cls, attr)
        if mark is not None:
            names, operands = mark
            for name in names:
                out.append((name, func, attr, operands == "all"))
        elif attr in prims and not attr.startswith("_") and attr not in HOOKS:
            out.append((attr, func, attr, False))  # an implicit handler
    return out


def _inherited_mark(cls: type, attr: str) -> Any:
    """The `quax.handler` registration of the function that `cls.attr` overrides: an
    override without a decorator of its own takes its place."""
    for base in cls.__mro__[1:]:
        if attr in base.__dict__:
            obj = base.__dict__[attr]
            func = obj.__func__ if isinstance(obj, staticmethod) else obj
            return getattr(func, _HANDLER_MARK, None)
    return None


def build_table(cls: type) -> HandlerTable:
    """Build (and keep) the handler table of `cls`: its own handlers in definition
    order, then each base's in MRO order, skipping a base's function whose attribute
    a more derived class redefines (Python's attribute lookup). Raises `TypeError`
    for an overload that can never be reached; warns (`QuaxWarning`) for an implicit
    handler that cannot take its primitive's parameters."""
    positional: dict[str, list[Handler]] = {}
    anywhere: dict[str, list[Handler]] = {}
    shadowed: set[str] = set()
    for klass in cls.__mro__:
        own = _own_handlers(klass) if klass is not object else []
        seen: dict[tuple[str, bool], Handler] = {}
        for name, func, attr, all_ops in own:
            if attr in shadowed:
                continue
            table = anywhere if all_ops else positional
            overloads = table.setdefault(name, [])
            if any(h.fn is func for h in overloads):
                continue
            h = Handler(func, attr, klass, all_ops)
            if klass is cls:
                _check_reachable(cls, name, seen.get((name, all_ops)), h)
                _check_params(cls, name, h, implicit=attr == name)
            if not h.annotated:
                seen.setdefault((name, all_ops), h)
            overloads.append(h)
        shadowed.update(klass.__dict__)
    table = HandlerTable(
        {n: tuple(hs) for n, hs in positional.items()},
        {n: tuple(hs) for n, hs in anywhere.items()},
    )
    _TABLES[cls] = table
    return table


def _check_reachable(cls: type, name: str, catch_all: Handler | None, h: Handler):
    if catch_all is None:
        return
    raise TypeError(
        _MSG_UNREACHABLE_OVERLOAD.format(
            cls=cls.__name__,
            name=name,
            first=catch_all.attr,
            later=h.attr,
        )
    )


def _check_params(cls: type, name: str, h: Handler, *, implicit: bool) -> None:
    """Warn when a handler cannot take the parameters JAX binds its primitive with
    (no `**params`, no keyword-only parameters, and the primitive takes some)."""
    prim = primitive_handler_names().get(name)
    if prim is None or prim in PARAMLESS or h.var_kw or h.names_keywords:
        return
    hint = (
        f"mark it `@quax.not_handler` if it is not meant to handle `{prim}`, or add "
        "`**params` to its signature"
        if implicit
        else "add `**params` to its signature"
    )
    warnings.warn(
        _MSG_HANDLER_NO_PARAMS.format(
            cls=cls.__name__, attr=h.attr, prim=prim, name=name, hint=hint
        ),
        QuaxWarning,
        stacklevel=_user_stacklevel(),
    )


_SKIP_DIRS: Final = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(inspect.getfile(jax))) + os.sep,
)


def _user_stacklevel() -> int:
    """The `stacklevel` of the innermost frame outside quax, JAX, equinox and frozen
    modules (`abc`): the class statement that created the class."""
    import equinox  # noqa: PLC0415 -- only for its location

    skip = (*_SKIP_DIRS, os.path.dirname(os.path.abspath(equinox.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(skip) and "<frozen" not in name:
            return level
        frame, level = frame.f_back, level + 1
    return 1
