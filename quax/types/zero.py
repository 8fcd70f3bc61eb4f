"""Symbolic zeros: an array known to be all zeros, which costs nothing to compute with.

`Zero` stores only a shape, a dtype and a weak type. Linear and structural primitives,
and the elementwise functions with `f(0) = 0`, return a `Zero` without emitting any
equation; `add`/`sub` return the other operand. Anything else materialises
`jnp.zeros(shape, dtype)`.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._values import ArrayValue, Value, handler_name
from .._walker import static_key


def _keeps_zero(prim: jexc.Primitive, *, nonempty: bool = False) -> Callable[..., Any]:
    """The handler for `prim` when its operand 0 is a `Zero` and the result is then
    zero whatever the other operands (indices, sizes): a `Zero` of the result's shape.
    With `nonempty`, declines when operand 0 has no elements (`max` of nothing is
    `-inf`). Defined before the class, whose body is the table of these handlers."""

    def handler(self: "Zero", *operands: Any, **params: Any) -> Any:
        if (nonempty and 0 in self._shape) or _places(params):
            return NotImplemented
        return _zero(_out_struct(prim, (self, *operands), params))

    handler.__name__ = handler.__qualname__ = handler_name(prim.name)
    handler.__doc__ = f"`{prim.name}` of zeros is zeros."
    return handler


class Zero(ArrayValue):
    """An array of zeros of a given shape and dtype, known to be zero while tracing.
    Operations on it are resolved symbolically, like JAX's own symbolic zeros in
    autodiff: `x + Zero(...)` is `x`, `Zero(...) * x` is a `Zero`, and the compiled
    program contains no work for them.

    Handles: add/add_any/sub (either side), mul, div (zero numerator), dot_general
    (either side), select_n (a zero predicate, or all cases zero), concatenate (all
    zero), pad (zero padding value), integer_pow (positive powers), and the shape
    and f(0)=0 primitives listed in the class body. Anything else materialises.

    Like every value with no array leaves, a `Zero` returned from inside `jax.vmap`
    has the per-example shape: it is the same for every batch element.
    """

    _shape: tuple[int, ...] = eqx.field(static=True)
    _dtype: Any = eqx.field(static=True)
    _weak_type: bool = eqx.field(static=True)

    def __init__(self, shape: tuple[int, ...], dtype: Any, *, weak_type: bool = False):
        """**Arguments:**

        - `shape`: the shape of the array of zeros.
        - `dtype`: its dtype.
        - `weak_type`: whether the dtype is weak, as for a Python scalar (JAX sets
            this on results; you rarely need it).
        """
        try:
            self._shape = tuple(int(d) for d in shape)
        except TypeError as err:
            raise TypeError(
                f"`Zero` expects `shape` to be a tuple of ints, got {shape!r}."
            ) from err
        self._dtype = jax.dtypes.canonicalize_dtype(dtype)
        self._weak_type = bool(weak_type)

    def __check_init__(self):
        if any(d < 0 for d in self._shape):
            raise ValueError(
                f"`Zero` expects a `shape` of non-negative sizes, got {self._shape}."
            )

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self._shape, self._dtype, weak_type=self._weak_type)

    def shard_structure(self, shape: tuple[int, ...]) -> "Zero":
        return Zero(shape, self._dtype, weak_type=self._weak_type)

    def materialise(self) -> Array:
        return jnp.zeros(self._shape, self._dtype)

    # -- addition: the other operand, broadcast and cast to the result --

    def add(self, other: Any, /, **params):
        out = _out_struct(lax.add_p, (self, other), params)
        return _fit(other, out)

    radd = add
    add_any = add
    radd_any = add

    def sub(self, other: Any, /, **params):
        out = _out_struct(lax.sub_p, (self, other), params)
        if isinstance(other, Zero):
            return _zero(out)
        if isinstance(other, Value):
            return NotImplemented
        return lax.neg(_fit(other, out))

    def rsub(self, other: Any, /, **params):
        return _fit(other, _out_struct(lax.sub_p, (other, self), params))

    # -- multiplication: zero whatever the other operand --

    def mul(self, other: Any, /, **params):
        """`0 * x` is zero; when `x` is known while tracing and holds an infinity or
        a NaN (where `0 * x` is NaN), declines."""
        if _known_nonfinite(other) or _places(params):
            return NotImplemented
        return _zero(_out_struct(lax.mul_p, (self, other), params))

    def rmul(self, other: Any, /, **params):
        if _known_nonfinite(other) or _places(params):
            return NotImplemented
        return _zero(_out_struct(lax.mul_p, (other, self), params))

    def div(self, other: Any, /, **params):
        """`0 / x` is zero when `x` is known while tracing to hold no zero and no NaN
        (`0 / 0` is NaN); otherwise declines."""
        if not _known_nonzero(other) or _places(params):
            return NotImplemented
        return _zero(_out_struct(lax.div_p, (self, other), params))

    def max(self, other: Any, /, **params):
        """`max(0, 0)` is zero (as in `relu` of a zero); other operands decline."""
        return _both_zero(lax.max_p, self, other, params)

    rmax = max

    def min(self, other: Any, /, **params):
        return _both_zero(lax.min_p, self, other, params)

    rmin = min

    def dot_general(self, other: Any, /, **params):
        """Zero of the result's shape and (preferred) dtype; `precision` does not
        change zeros. Declines as `mul` does, and for an `out_sharding`."""
        if _known_nonfinite(other) or _places(params):
            return NotImplemented
        return _zero(_out_struct(lax.dot_general_p, (self, other), params))

    def rdot_general(self, other: Any, /, **params):
        if _known_nonfinite(other) or _places(params):
            return NotImplemented
        return _zero(_out_struct(lax.dot_general_p, (other, self), params))

    def integer_pow(self, /, *, y, **params):
        if y <= 0:
            return NotImplemented  # 0**0 is 1; negative powers are infinite
        return _zero(_out_struct(lax.integer_pow_p, (self,), dict(params, y=y)))

    # -- selection and joining --

    def select_n(self, *cases: Any, **params):
        """A zero predicate picks the first case."""
        out = _out_struct(lax.select_n_p, (self, *cases), params)
        return _fit(cases[0], out)

    def concatenate(self, *others: Any, **params):
        return _all_zero(lax.concatenate_p, (self, *others), params, data=slice(None))

    def dynamic_update_slice(self, update: Any, *indices: Any, **params):
        """Zeros written into zeros leave zeros."""
        if not isinstance(update, Zero):
            return NotImplemented
        return _zero(
            _out_struct(lax.dynamic_update_slice_p, (self, update, *indices), params)
        )

    def pad(self, padding_value: Any, /, **params):
        """Zero when the padding value is a zero known while tracing."""
        if not (isinstance(padding_value, Zero) or _is_known_zero(padding_value)):
            return NotImplemented
        return _zero(_out_struct(lax.pad_p, (self, padding_value), params))

    @staticmethod
    def default(primitive: jexc.Primitive, operands: tuple[Any, ...], params: dict):
        """Zeros in positions no handler method sees: `select_n` whose cases are all
        zero, and `concatenate` of zeros."""
        if primitive is lax.select_n_p:
            return _all_zero(primitive, operands, params, data=slice(1, None))
        if primitive is lax.concatenate_p:
            return _all_zero(primitive, operands, params, data=slice(None))
        return NotImplemented

    # -- slicing and stacking (`lax.scan` xs and ys): no arrays at all --

    def unstack(self, length: int):
        """A zero scanned over is a zero in every step: nothing to slice."""
        if not self._shape or self._shape[0] != length:
            return None
        piece = Zero(self._shape[1:], self._dtype, weak_type=self._weak_type)
        return (), lambda _: piece

    def stack(self, length: int):
        """Zeros from every step stack into one zero: nothing to stack."""
        whole = Zero((length, *self._shape), self._dtype, weak_type=self._weak_type)
        return (), lambda _: whole

    # -- shape: a zero of the new shape (other operands are indices or sizes) --

    broadcast_in_dim = _keeps_zero(lax.broadcast_in_dim_p)
    reshape = _keeps_zero(lax.reshape_p)
    transpose = _keeps_zero(lax.transpose_p)
    squeeze = _keeps_zero(lax.squeeze_p)
    rev = _keeps_zero(lax.rev_p)
    slice = _keeps_zero(lax.slice_p)
    dynamic_slice = _keeps_zero(lax.dynamic_slice_p)

    def gather(self, indices: Any, /, **params):
        """Zero where every element comes from the operand: `clip` and
        `promise_in_bounds` modes, a `fill` whose value is `+0`, or indices known
        while tracing to be in bounds. Otherwise (an out-of-bounds index gives
        `fill_value`, NaN by default) declines."""
        if _places(params) or not _gather_reads_operand(self._shape, indices, params):
            return NotImplemented
        return _zero(_out_struct(lax.gather_p, (self, indices), params))

    convert_element_type = _keeps_zero(lax.convert_element_type_p)
    copy = _keeps_zero(lax.copy_p)
    reduce_precision = _keeps_zero(lax.reduce_precision_p)

    # -- reductions and scans of zeros --

    reduce_sum = _keeps_zero(lax.reduce_sum_p)
    reduce_max = _keeps_zero(lax.reduce_max_p, nonempty=True)
    reduce_min = _keeps_zero(lax.reduce_min_p, nonempty=True)
    argmax = _keeps_zero(lax.argmax_p, nonempty=True)
    argmin = _keeps_zero(lax.argmin_p, nonempty=True)
    cumsum = _keeps_zero(lax.cumsum_p)
    cummax = _keeps_zero(lax.cummax_p)
    cummin = _keeps_zero(lax.cummin_p)
    cumprod = _keeps_zero(lax.cumprod_p)

    # -- elementwise functions with f(0) = 0 --

    neg = _keeps_zero(lax.neg_p)
    sin = _keeps_zero(lax.sin_p)
    tan = _keeps_zero(lax.tan_p)
    sinh = _keeps_zero(lax.sinh_p)
    tanh = _keeps_zero(lax.tanh_p)
    asin = _keeps_zero(lax.asin_p)
    atan = _keeps_zero(lax.atan_p)
    asinh = _keeps_zero(lax.asinh_p)
    atanh = _keeps_zero(lax.atanh_p)
    sqrt = _keeps_zero(lax.sqrt_p)
    cbrt = _keeps_zero(lax.cbrt_p)
    abs = _keeps_zero(lax.abs_p)
    sign = _keeps_zero(lax.sign_p)
    square = _keeps_zero(lax.square_p)
    expm1 = _keeps_zero(lax.expm1_p)
    log1p = _keeps_zero(lax.log1p_p)
    erf = _keeps_zero(lax.erf_p)
    erf_inv = _keeps_zero(lax.erf_inv_p)
    floor = _keeps_zero(lax.floor_p)
    ceil = _keeps_zero(lax.ceil_p)
    round = _keeps_zero(lax.round_p)
    real = _keeps_zero(lax.real_p)
    imag = _keeps_zero(lax.imag_p)
    conj = _keeps_zero(lax.conj_p)
    stop_gradient = _keeps_zero(jexc.primitives.stop_gradient_p)


# -- private helpers ------------------------------------------------------------------


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    aval: Any = x.aval() if isinstance(x, Value) else jax.typeof(x)
    return jax.ShapeDtypeStruct(
        aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False)
    )


def _out_struct(
    prim: jexc.Primitive, operands: tuple[Any, ...], params: dict[str, Any]
) -> jax.ShapeDtypeStruct:
    """The shape, dtype and weak type JAX gives `prim` on these operands: abstract
    evaluation only, so nothing is emitted into the surrounding trace."""
    structs = tuple(_struct(x) for x in operands)
    try:
        items = tuple(sorted(params.items()))
        # `static_key` too: `==` merges `0.0`/`-0.0` and `1`/`1.0`/`True`.
        return _cached_out_struct(prim, structs, items, static_key(items))
    except TypeError:  # an unhashable param: evaluate without the cache
        return _eval_out_struct(prim, structs, params)


@ft.lru_cache(maxsize=4096)
def _cached_out_struct(prim, structs, items, strict_key) -> jax.ShapeDtypeStruct:
    return _eval_out_struct(prim, structs, dict(items))


def _eval_out_struct(prim, structs, params) -> jax.ShapeDtypeStruct:
    out = jax.eval_shape(lambda *xs: prim.bind(*xs, **params), *structs)
    if prim.multiple_results:
        raise NotImplementedError(
            f"quax: `Zero` has no rule for the multiple-result primitive "
            f"`{prim.name}`. This is a bug in quax; please report it."
        )
    return out


def _zero(out: jax.ShapeDtypeStruct) -> Zero:
    return Zero(out.shape, out.dtype, weak_type=out.weak_type)


def _fit(x: Any, out: jax.ShapeDtypeStruct) -> Any:
    """`x` as the result `out` of an equation that returns it unchanged up to
    broadcasting and dtype (`x + 0`): no equation when nothing needs to change."""
    if isinstance(x, Zero):
        return _zero(out)
    if isinstance(x, Value):
        aval: Any = x.aval()
        same = tuple(aval.shape) == tuple(out.shape) and aval.dtype == out.dtype
        return x if same else NotImplemented
    x = jnp.asarray(x)
    if x.dtype != out.dtype:
        x = lax.convert_element_type(x, out.dtype)
    if x.shape != tuple(out.shape):
        x = jnp.broadcast_to(x, out.shape)
    return x


def _all_zero(
    prim: jexc.Primitive, operands: tuple[Any, ...], params: dict[str, Any], *, data
) -> Any:
    if not all(isinstance(x, Zero) for x in operands[data]):
        return NotImplemented
    return _zero(_out_struct(prim, operands, params))


def _both_zero(prim: jexc.Primitive, zero: Zero, other: Any, params: dict) -> Any:
    if not (isinstance(other, Zero) or _is_known_zero(other)):
        return NotImplemented
    return _zero(_out_struct(prim, (zero, other), params))


def _known(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array if it is known while tracing, else None."""
    if isinstance(x, Value | jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 -- not concrete: not known
        return None


def _is_known_zero(x: Any) -> bool:
    """Known to be `+0` everywhere (a `-0.0` would make the result's zeros negative)."""
    a = _known(x)
    if a is None:
        return False
    if np.issubdtype(a.dtype, np.inexact):
        return bool(np.all(a == 0) and not np.any(np.signbit(np.real(a))))
    return bool(np.all(a == 0))


def _known_nonfinite(x: Any) -> bool:
    """Known to hold an infinity or a NaN (times zero: NaN)."""
    a = _known(x)
    if a is None or not np.issubdtype(a.dtype, np.inexact):
        return False
    return bool(not np.all(np.isfinite(a)))


def _known_nonzero(x: Any) -> bool:
    """Known to hold no zero and no NaN (so zero divided by it is zero)."""
    a = _known(x)
    if a is None:
        return False
    if np.issubdtype(a.dtype, np.inexact):
        return bool(np.all(a != 0) and not np.any(np.isnan(a)))
    return bool(np.all(a != 0))


def _places(params: dict[str, Any]) -> bool:
    """A sharding asked of the result: a `Zero` has no arrays to place, so declines
    (the dense path honours it)."""
    return params.get("sharding") is not None or params.get("out_sharding") is not None


def _gather_reads_operand(shape: tuple[int, ...], indices: Any, params: dict) -> bool:
    """Whether every element of this gather comes from the operand (so gathering
    zeros gives zeros), not from `fill_value`."""
    mode = lax.GatherScatterMode.from_any(params.get("mode"))
    if mode in (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS):
        return True
    if mode is not lax.GatherScatterMode.FILL_OR_DROP:
        return False  # a mode this rule does not know
    fill = params.get("fill_value")
    if fill is not None and _is_known_zero(fill):
        return True
    idx = _known(indices)
    if idx is None:
        return False
    # In bounds: for each indexed dimension d, 0 <= start <= shape[d] - slice_size.
    dnums = params["dimension_numbers"]
    slice_sizes = params["slice_sizes"]
    starts = idx.reshape(-1, idx.shape[-1]) if idx.ndim else idx.reshape(1, 1)
    for k, d in enumerate(dnums.start_index_map):
        column = starts[:, k]
        if np.any(column < 0) or np.any(column > shape[d] - slice_sizes[d]):
            return False
    return True
