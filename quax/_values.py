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
import jax.tree_util as jtu
import numpy as np

from ._errors import (
    _MSG_BAD_AVAL,
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
    # By type, memoised: `isinstance` against an ABC costs about a microsecond, and
    # every call of a quaxified function asks it of every leaf.
    t = type(x)
    known = _VALUE_TYPES.get(t)
    if known is None:
        known = _VALUE_TYPES[t] = isinstance(x, Value)
    return known


_VALUE_TYPES: dict[type, bool] = {}


def aval_of(value: "Value") -> Any:
    """`value.aval()`, without the bound-method object equinox builds on every method
    access (about 35 us each, on the hot path of every call and equation); a
    `HandlerResultError` if it is not an abstract value with a shape and dtype."""
    aval = type(value).aval(value)
    if type(aval) is not jax.core.ShapedArray and not (
        isinstance(aval, jax.core.AbstractValue)
        and hasattr(aval, "shape")
        and hasattr(aval, "dtype")
    ):
        got = f"{aval!r} (a {type(aval).__name__})"
        raise HandlerResultError(
            _MSG_BAD_AVAL.format(cls=type(value).__name__, got=got)
        )
    return aval


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


def _leading(leaf: Any) -> int | None:
    """The size of a leaf's axis 0, or None for a scalar."""
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return shape[0] if shape else None


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

    # -- slicing and stacking along a leading axis (`lax.scan` xs and ys) --

    def scan_leafwise(self) -> bool:
        """A shortcut for `unstack` and `stack`: whether slicing (stacking) every leaf
        of this value along axis 0 slices (stacks) the value.

        Return True only if, for every `i`, `jax.tree.map(lambda l: l[i], v)` is the
        value whose `materialise()` is `materialise(v)[i]` (e.g. a stack of LoRA
        weights with a leading layer axis on every leaf). The default, False,
        materialises the value first: always correct, but the body sees an array.
        It is called on traced values, so decide from structure, not contents.
        """
        return False

    def unstack(self, length: int) -> tuple[Any, Callable[[Any], Any]] | None:
        """How to split this value along axis 0 into `length` values (a value as
        `lax.scan`'s `xs`, or `lax.map`'s input), so the scanned body sees values.

        Return `(arrays, rebuild)`: every leaf of the pytree `arrays` has leading axis
        `length`, and `rebuild(slices)`, given `arrays` sliced at one index `i`, is the
        value whose `materialise()` is `materialise(self)[i]`. `rebuild` must close
        over static data only, never over this value's arrays. Return None to have
        quax materialise the value instead.

        The default follows `scan_leafwise()`: if True, and every leaf has the leading
        axis `length`, the leaves are sliced one by one; otherwise None.
        """
        if not type(self).scan_leafwise(self):  # no bound method: see `aval_of`
            return None
        leaves, treedef = jtu.tree_flatten(self)
        if not leaves or not all(_leading(leaf) == length for leaf in leaves):
            return None
        return leaves, ft.partial(jtu.tree_unflatten, treedef)

    def stack(self, length: int) -> tuple[Any, Callable[[Any], Any]] | None:
        """How to stack `length` per-step values like this one (same class and static
        fields) along a new axis 0 (a value among `lax.scan`'s `ys`).

        Return `(arrays, rebuild)`: `arrays` is this step's pytree of arrays, and
        `rebuild(stacked)`, given those arrays of every step stacked along a new axis
        0, is the value whose `materialise()` is the stack of the steps'
        `materialise()`s. `rebuild` must close over static data only. Return None to
        have quax materialise each step's value instead.

        The default follows `scan_leafwise()`: if True, the leaves are stacked one by
        one; otherwise None.
        """
        if not type(self).scan_leafwise(self):  # no bound method: see `aval_of`
            return None
        leaves, treedef = jtu.tree_flatten(self)
        if not leaves:
            return None
        return leaves, ft.partial(jtu.tree_unflatten, treedef)

    # -- one kind for two: where a `cond`'s branches or a loop's carry disagree --

    def join(self, other: Any) -> "ArrayValue | None":
        """`other` (a plain array of this value's shape and dtype, or another value
        of this class) re-expressed exactly as a value of a kind that can hold this
        value too, so a `cond` whose branches return this value and `other`, or a
        loop carry that starts as `other`, need not materialise either.

        Return a value of this class whose `materialise()` equals `other` as an
        array, with the same derivatives, and whose kind (static fields, leaf shapes
        and dtypes) `K` is also the kind of `result.join(self)`; or None (the
        default): quax materialises both. Read only this value's kind, never its
        leaves (they may be abstract `jax.ShapeDtypeStruct`s)."""
        return None

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    # -- conversion to Python scalars: as a JAX array does --
    # A value that cannot convert (`bool` of two elements, `int` of a 1-d value, a
    # traced value) raises JAX's own error; one that can is materialised and its
    # element converted, concretely and eagerly.

    def __bool__(self) -> bool:
        return self._to_python(bool)

    def __int__(self) -> int:
        return self._to_python(int)

    def __float__(self) -> float:
        return self._to_python(float)

    def __complex__(self) -> complex:
        return self._to_python(complex)

    def __index__(self) -> int:
        return self._to_python(operator.index)

    def _to_python(self, convert: Callable[[Any], Any]) -> Any:
        aval = aval_of(self)
        size = int(np.prod(aval.shape, dtype=np.int64))
        if convert is bool:
            refused = size != 1
            stand_in = (0,) if size == 0 else (2,) + (1,) * (len(aval.shape) - 1)
        else:
            refused = len(aval.shape) != 0
            stand_in = (1,) * len(aval.shape)
        if refused:
            # JAX's error from an array of at most two elements that converts the
            # same way, without materialising this value.
            convert(jnp.zeros(stand_in, aval.dtype))
        return convert(materialise(self))

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

    def leaf_specs(self, spec: Any) -> Any:
        """How a `PartitionSpec` of the logical array this value stands for maps onto
        its leaves: a pytree shaped like `self` with a `PartitionSpec` at every leaf.
        Used by `jax.device_put`, `with_sharding_constraint` and `shard_map` (and so
        `jax.pmap`) on values, and by `quax.leaf_shardings`.

        The default gives `spec` to every leaf of the value's own shape and replicates
        every other leaf (`PartitionSpec()`): right whenever the other leaves are
        small parameters every shard needs whole (a scale, a bias). Override it when a
        leaf holds a slice of the logical array along a sharded axis (LoRA's `a` and
        `b` do).
        """
        from jax.sharding import PartitionSpec

        shape = tuple(aval_of(self).shape)

        def one(leaf: Any) -> Any:
            same = tuple(getattr(leaf, "shape", ())) == shape
            return spec if same else PartitionSpec()

        return jax.tree.map(one, self)

    def shard_structure(self, shape: tuple[int, ...]) -> "ArrayValue":
        """This value's structure for one block of shape `shape` (one device's shard
        in `shard_map`, or the whole array a shard belongs to): a value whose static
        fields fit `shape`; its leaves are ignored. The default, `self`, is right when
        no static field depends on the shape; `Zero` returns `Zero(shape, dtype)`."""
        return self

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

    # -- derivatives: how tangents and cotangents cross `materialise()` --
    # Used where a custom derivative rule (`jax.custom_jvp`, `jax.custom_vjp`) runs on
    # dense tangents: quax/handlers/_custom_derivatives.py. None is a handler.

    def pushforward(self, tangent: Any) -> Any:
        """The dense tangent of `materialise()` when this value's leaves move along
        `tangent` (a pytree like `self`, holding one tangent per leaf; zeros where a
        leaf is not perturbed): the JVP of `materialise()`. Override it to compute
        the tangent without forming the dense value; it must be linear in `tangent`.
        The default differentiates `materialise()`."""
        return jax.jvp(lambda v: materialise(v), (self,), (tangent,))[1]

    def pullback(self, cotangent: Any) -> Any:
        """The cotangents of this value's leaves, as a pytree like `self`, given the
        dense `cotangent` of `materialise()`: the transpose of `pushforward`. Override
        it to pull back structurally (LoRA: `a` and `b` need only `a`, `b` and the
        cotangent, never `w + a @ b`). The default differentiates `materialise()`."""
        _, pull = jax.vjp(lambda v: materialise(v), self)
        return pull(cotangent)[0]

    def lift_tangent(self, tangent: Any) -> Any:
        """Tangents for this value's leaves (a pytree like `self`; None for a leaf
        that does not move) whose `pushforward` is the dense `tangent`, for every
        `tangent`: a right inverse of `pushforward`, linear in `tangent`. Return None
        (the default) when this value cannot carry every tangent (a `Zero` has no
        leaves; `w + a @ b` with `w` frozen has low rank).

        With it, a value that a custom derivative rule (`jax.nn.relu`, `logaddexp`,
        a user's `jax.custom_jvp`) returns stays a value under differentiation: the
        rule's dense tangent is lifted onto the leaves (and a cotangent goes back by
        its transpose). Without it such an output is materialised. A dense wrapper
        (`materialise()` returns a leaf) returns `type(self)(tangent)`."""
        del tangent
        return None


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
