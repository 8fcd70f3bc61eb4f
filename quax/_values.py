"""`Value` and `ArrayValue`: the base classes of every array-ish type.

A subclass is an equinox Module that says what JAX sees (`aval()`), how to become a
plain array (`materialise()`), and handles primitives with methods named after them.
"""

import abc
import functools as ft
import inspect
import operator
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import jax.numpy as jnp
import numpy as np

from ._errors import (
    _MSG_BAD_MATERIALISE,
    _MSG_PRIMITIVE_ATTRIBUTE,
    HandlerResultError,
    describe_aval,
)
from ._table import (
    build_table,
    handler_name as handler_name,
    is_not_handler,
    primitive_handler_names as primitive_handler_names,
)


def is_value(x: Any) -> bool:
    return isinstance(x, Value)


def aval_of(value: "Value") -> Any:
    """`value.aval()`, without the bound-method object equinox builds on every method
    access (about 35 us each, on the hot path of every call and equation)."""
    return type(value).aval(value)


def _is_method_like(attr: Any) -> bool:
    return inspect.isfunction(attr) or isinstance(attr, staticmethod | classmethod)


class Value(eqx.Module):
    """Base class of everything quax dispatches on.

    Subclasses implement `aval()` and `materialise()`, and define handler methods named
    after JAX primitives (see `quax.ArrayValue`). They may override the staticmethod
    `default(primitive, operands, params)`, asked when no handler takes an equation.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_namespace(cls)
        build_table(cls)  # the handlers, read by dispatch (quax/_table.py)

    @abc.abstractmethod
    def aval(self) -> jax.core.AbstractValue:
        """What JAX sees in place of this value: usually a `jax.core.ShapedArray`."""

    @abc.abstractmethod
    def materialise(self) -> Any:
        """This value as a plain JAX array with the shape and dtype of `aval()`.

        Raise here (with a message) if the type must never be turned into an array.
        """

    @staticmethod
    def default(
        primitive: jexc.Primitive, operands: tuple[Any, ...], params: dict[str, Any]
    ) -> Any:
        """Asked when no handler method takes an equation. Return the result(s) of
        `primitive.bind(*operands, **params)`, or `NotImplemented` to let quax
        materialise the operands. The default implementation declines."""
        return NotImplemented


def _check_namespace(cls: type) -> None:
    """A field, property or constant named like a primitive would become a handler."""
    prims = primitive_handler_names()
    annotations = cls.__dict__.get("__annotations__", {})
    for attr in annotations:
        if attr in prims and not attr.startswith("_"):
            raise TypeError(
                _MSG_PRIMITIVE_ATTRIBUTE.format(
                    cls=cls.__name__, kind="a field", attr=attr, prim=prims[attr]
                )
            )
    for attr, obj in cls.__dict__.items():
        if (
            attr.startswith("_")
            or attr not in prims
            or _is_method_like(obj)
            or is_not_handler(obj)
        ):
            continue
        kind = "a property" if isinstance(obj, property) else "an attribute"
        raise TypeError(
            _MSG_PRIMITIVE_ATTRIBUTE.format(
                cls=cls.__name__, kind=kind, attr=attr, prim=prims[attr]
            )
        )


def materialise(value: Value) -> Any:
    """`value.materialise()`, checked against `value.aval()`; values that materialise
    into other values are materialised again."""
    out = value.materialise()
    while isinstance(out, Value):
        out = out.materialise()
    expected = aval_of(value)
    got = jax.typeof(out) if _is_arraylike(out) else None
    if got is None or not _same_shape_dtype(got, expected):
        raise HandlerResultError(
            _MSG_BAD_MATERIALISE.format(
                cls=type(value).__name__,
                got=_describe(out),
                expected=describe_aval(expected),
            )
        )
    return out


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _same_shape_dtype(a: Any, b: Any) -> bool:
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype


def _describe(x: Any) -> str:
    if _is_arraylike(x):
        return "an array of " + describe_aval(jax.typeof(x))
    return f"an object of type {type(x).__name__}"


# -- ArrayValue ---------------------------------------------------------------------


class ArrayValue(Value):
    """An array-ish value: anything whose `aval()` is a `jax.core.ShapedArray`.

    Subclass it, declare fields as in any equinox Module, implement `aval()` and
    `materialise()`, and add handler methods named after the primitives you want to
    handle (`def dot_general(self, other, /, **params)`, `def radd(self, other, /)`),
    or register methods of any name with `@quax.handler(...)` (overloads, and
    handlers for a value at any operand position). Everything without a handler
    materialises. Outside `quax.quaxify`, Python's
    operators (`+`, `@`, `-v`, `v[i]`, `v.T`, `<`, ...) run the `jax.numpy` operation
    under `quaxify`; `==` and `!=` keep equinox's Module equality.
    """

    @abc.abstractmethod
    def aval(self) -> jax.core.ShapedArray:
        """The shape and dtype JAX sees in place of this value."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(aval_of(self).shape)

    @property
    def dtype(self) -> Any:
        return aval_of(self).dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def T(self) -> Any:
        return _quaxified(jnp.transpose)(self)

    def scan_leafwise(self) -> bool:
        """Whether `lax.scan` may slice this value along its leading axis leaf by leaf
        (a value as `xs`), and stack per-step values of this type the same way (as
        `ys`), so the scanned body sees values and runs their handlers.

        Return True only if, for every `i`, `jax.tree.map(lambda l: l[i], v)` is the
        value whose `materialise()` is `materialise(v)[i]` (e.g. a stack of LoRA
        weights with a leading layer axis on every leaf). The default, False,
        materialises the value first: always correct, but the body sees an array.
        It is called on traced values, so decide from structure, not contents.
        """
        return False

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __getitem__(self, index: Any) -> Any:
        return _quaxified(operator.getitem)(self, index)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            f"quax: a {type(self).__name__} is not converted to a NumPy array "
            "implicitly (that would materialise it silently).\n"
            f"To fix: call `.materialise()` first, e.g. `np.asarray(value.materialise())`."
        )

    # -- operators: each runs the `jax.numpy` function under `quax.quaxify` --

    def __add__(self, other: Any) -> Any:
        return _binop(jnp.add, self, other)

    def __radd__(self, other: Any) -> Any:
        return _binop(jnp.add, other, self)

    def __sub__(self, other: Any) -> Any:
        return _binop(jnp.subtract, self, other)

    def __rsub__(self, other: Any) -> Any:
        return _binop(jnp.subtract, other, self)

    def __mul__(self, other: Any) -> Any:
        return _binop(jnp.multiply, self, other)

    def __rmul__(self, other: Any) -> Any:
        return _binop(jnp.multiply, other, self)

    def __matmul__(self, other: Any) -> Any:
        return _binop(jnp.matmul, self, other)

    def __rmatmul__(self, other: Any) -> Any:
        return _binop(jnp.matmul, other, self)

    def __truediv__(self, other: Any) -> Any:
        return _binop(jnp.true_divide, self, other)

    def __rtruediv__(self, other: Any) -> Any:
        return _binop(jnp.true_divide, other, self)

    def __floordiv__(self, other: Any) -> Any:
        return _binop(jnp.floor_divide, self, other)

    def __rfloordiv__(self, other: Any) -> Any:
        return _binop(jnp.floor_divide, other, self)

    def __mod__(self, other: Any) -> Any:
        return _binop(jnp.mod, self, other)

    def __rmod__(self, other: Any) -> Any:
        return _binop(jnp.mod, other, self)

    def __pow__(self, other: Any) -> Any:
        return _binop(jnp.power, self, other)

    def __rpow__(self, other: Any) -> Any:
        return _binop(jnp.power, other, self)

    def __and__(self, other: Any) -> Any:
        return _binop(jnp.bitwise_and, self, other)

    def __rand__(self, other: Any) -> Any:
        return _binop(jnp.bitwise_and, other, self)

    def __or__(self, other: Any) -> Any:
        return _binop(jnp.bitwise_or, self, other)

    def __ror__(self, other: Any) -> Any:
        return _binop(jnp.bitwise_or, other, self)

    def __xor__(self, other: Any) -> Any:
        return _binop(jnp.bitwise_xor, self, other)

    def __rxor__(self, other: Any) -> Any:
        return _binop(jnp.bitwise_xor, other, self)

    def __lshift__(self, other: Any) -> Any:
        return _binop(jnp.left_shift, self, other)

    def __rlshift__(self, other: Any) -> Any:
        return _binop(jnp.left_shift, other, self)

    def __rshift__(self, other: Any) -> Any:
        return _binop(jnp.right_shift, self, other)

    def __rrshift__(self, other: Any) -> Any:
        return _binop(jnp.right_shift, other, self)

    def __lt__(self, other: Any) -> Any:
        return _binop(jnp.less, self, other)

    def __le__(self, other: Any) -> Any:
        return _binop(jnp.less_equal, self, other)

    def __gt__(self, other: Any) -> Any:
        return _binop(jnp.greater, self, other)

    def __ge__(self, other: Any) -> Any:
        return _binop(jnp.greater_equal, self, other)

    def __neg__(self) -> Any:
        return _quaxified(jnp.negative)(self)

    def __pos__(self) -> Any:
        return _quaxified(jnp.positive)(self)

    def __abs__(self) -> Any:
        return _quaxified(jnp.abs)(self)

    def __invert__(self) -> Any:
        return _quaxified(jnp.invert)(self)

    # numpy arrays on the left defer to our reflected operators.
    __array_ufunc__ = None


def _operand_ok(x: Any) -> bool:
    return isinstance(
        x, Value | jax.Array | np.ndarray | np.generic | int | float | complex
    )


@ft.cache
def _quaxified(fn: Callable) -> Callable:
    # `_quaxify` sits above `_values` in the layering; operators are the only way down.
    from ._quaxify import quaxify

    return quaxify(fn)


def _binop(fn: Callable, lhs: Any, rhs: Any) -> Any:
    if not (_operand_ok(lhs) and _operand_ok(rhs)):
        return NotImplemented
    return _quaxified(fn)(lhs, rhs)
