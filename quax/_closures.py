"""Values closed over by the function given to `quaxify`, lifted to inputs.

`quaxify(lambda x: model(x))` with a LoRA'd `model` captured: the model is in the
lambda's closure, where `quaxify` (which flattens `fn` as a pytree, and a function is
one opaque leaf) would never see its values, and tracing would meet a `LoraArray` as a
constant. As `jax.closure_convert` does for arrays, `lift_closure` finds values in
what `fn` captures and makes them inputs: the cells of a Python function's
`__closure__`, the `__self__` of a bound method, and the `args`/`keywords` of a
`functools.partial` (recursively: a partial of a closure). The result is an equinox
Module that calls `fn` with those captured objects replaced, so `quaxify` flattens
them like any argument. Functions capturing no value are returned unchanged.
"""

import functools as ft
import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._values import is_value


def _holds_value(x: Any) -> bool:
    try:
        leaves = jtu.tree_leaves(x, is_leaf=is_value)
    except Exception:  # an object that refuses flattening holds nothing we can lift
        return False
    return any(is_value(leaf) for leaf in leaves)


class _Closure(eqx.Module):
    """A Python function whose captured cells holding values are explicit fields."""

    fn: Any = eqx.field(static=True)  # a `types.FunctionType`
    positions: tuple[int, ...] = eqx.field(static=True)
    contents: tuple[Any, ...]
    names: tuple[str, ...] = eqx.field(static=True)
    globals: tuple[Any, ...]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cells: list[Any] = list(self.fn.__closure__ or ())
        for i, x in zip(self.positions, self.contents, strict=True):
            cells[i] = types.CellType(x)
        namespace = self.fn.__globals__
        if self.names:
            namespace = {
                **namespace,
                **dict(zip(self.names, self.globals, strict=True)),
            }
        fn = types.FunctionType(
            self.fn.__code__,
            namespace,
            self.fn.__name__,
            self.fn.__defaults__,
            tuple(cells) if self.fn.__closure__ is not None else None,
        )
        fn.__kwdefaults__ = self.fn.__kwdefaults__
        return fn(*args, **kwargs)


class _BoundMethod(eqx.Module):
    """`obj.method` with `obj` (which holds values) as a field."""

    function: Callable[..., Any] = eqx.field(static=True)
    obj: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.obj, *args, **kwargs)


class _Partial(eqx.Module):
    """`functools.partial(func, *args, **keywords)` with its arguments as fields."""

    func: Any
    args: tuple[Any, ...]
    keywords: dict[str, Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*self.args, *args, **{**self.keywords, **kwargs})


def lift_closure(fn: Any, _seen: frozenset[int] = frozenset()) -> Any:
    """`fn`, or an equivalent equinox Module in which the values `fn` captures (in
    its closure, bound `self`, or partial arguments) are fields."""
    if id(fn) in _seen:  # a recursive closure: lifted where first met
        return fn
    _seen = _seen | {id(fn)}
    if isinstance(fn, eqx.Module):
        return fn  # already a pytree: `quaxify` sees its values
    if isinstance(fn, ft.partial):
        func = lift_closure(fn.func, _seen)
        if func is fn.func and not _holds_value((fn.args, fn.keywords)):
            return fn
        return _Partial(func, tuple(fn.args), dict(fn.keywords))
    if isinstance(fn, types.MethodType):
        if _holds_value(fn.__self__):
            return _BoundMethod(fn.__func__, fn.__self__)
        return fn
    if isinstance(fn, types.FunctionType):
        positions, contents = [], []
        for i, cell in enumerate(fn.__closure__ or ()):
            try:
                x = cell.cell_contents
            except ValueError:  # an empty cell (a name not yet bound)
                continue
            lifted = _lift(x, _seen)
            if lifted is not None:
                positions.append(i)
                contents.append(lifted)
        # Module-level names the function reads directly (`lambda x: model(x)` at
        # the top of a script).
        names, values = [], []
        for name in fn.__code__.co_names:
            if name in fn.__globals__:
                lifted = _lift(fn.__globals__[name], _seen)
                if lifted is not None:
                    names.append(name)
                    values.append(lifted)
        if positions or names:
            return _Closure(
                fn, tuple(positions), tuple(contents), tuple(names), tuple(values)
            )
    return fn


def _lift(x: Any, seen: frozenset[int]) -> Any:
    """What to put in place of a captured `x`: None if it holds no value."""
    if isinstance(x, types.ModuleType | type):
        return None
    lifted = lift_closure(x, seen) if callable(x) and not is_value(x) else x
    if lifted is not x or _holds_value(x):
        return lifted
    return None
