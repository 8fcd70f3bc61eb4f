"""Quantized weights: int8 (or packed int4) values with per-channel or per-group
scales, dequantized on the fly inside the products that use them.

`QuantizedArray` stands for `q * scale`, where `q` holds integers in `[-qmax, qmax]`
(`qmax = 2**(bits-1) - 1`) and each scale covers `group_size` consecutive elements
along the quantization axis `axis` (all of them for per-channel scales). A product
that contracts `axis` (a linear layer's input) runs with per-channel scales as
`(q · x) * scale`: the integers are converted to floats as the product's operand and
the scales applied to its (smaller) output; with per-group scales the weight is
dequantized as the product's operand. Either way, XLA can fuse the conversion into
the product; whether it does depends on the backend (see the README's "QLoRA").
"""

import typing
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Int, Shaped

from .._values import ArrayValue


class QuantizedArray(ArrayValue):
    """A weight stored as integers and scales: `q * scale`, in the dtype of `scale`.

    Make one with `quax.quantized.quantize(w, bits=..., group_size=..., axis=...)`.

    Handles: `dot_general`/`rdot_general` contracting the quantization axis (the
    weight dequantized on the fly, never kept), `transpose`, `neg`, `mul` and `div` by
    a scalar (which scale the scales) and `convert_element_type` to floating dtypes. Anything
    else materialises `dequantize(w)` (use `quax.strict` to find where).
    """

    q: Int[Array, "..."]
    scale: Shaped[Array, "..."]
    bits: int = eqx.field(static=True)
    axis: int = eqx.field(static=True)
    group_size: int = eqx.field(static=True)

    def __check_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"`QuantizedArray.bits` must be 4 or 8, got {self.bits}.")
        q_shape, s_shape = tuple(self.q.shape), tuple(self.scale.shape)
        if not 0 <= self.axis < len(q_shape) or len(s_shape) != len(q_shape):
            raise ValueError(
                f"`QuantizedArray` got `q` of shape {q_shape}, `scale` of shape "
                f"{s_shape} and `axis={self.axis}`: `axis` must index both."
            )
        n = _logical_shape(q_shape, self.bits, self.axis)[self.axis]
        expected = tuple(
            n // self.group_size if i == self.axis else d for i, d in enumerate(q_shape)
        )
        if n % self.group_size or s_shape != expected:
            raise ValueError(
                f"`QuantizedArray.scale` must have shape {expected} (groups of "
                f"{self.group_size} along axis {self.axis} of a weight of logical "
                f"shape {_logical_shape(q_shape, self.bits, self.axis)}), got "
                f"{s_shape}."
            )

    def aval(self) -> jax.core.ShapedArray:
        # From the scales alone, so a gradient (whose integer leaves are None) has one.
        shape = tuple(
            d * self.group_size if i == self.axis else d
            for i, d in enumerate(self.scale.shape)
        )
        return jax.core.ShapedArray(shape, self.scale.dtype)

    def materialise(self) -> Array:
        return dequantize(self)

    # -- products --

    def dot_general(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`w·x` contracting the quantization axis (alone): the integers are the
        product's operand and the scales are applied to its output (per-channel) or
        to its operand (per-group); declines other contractions."""
        return _quantized_dot(self, other, dimension_numbers, params, is_lhs=True)

    def rdot_general(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`x·w`: self is operand 1 here."""
        return _quantized_dot(self, other, dimension_numbers, params, is_lhs=False)

    # -- structure-keeping --

    def transpose(self, /, *, permutation, **params):
        if params:
            return NotImplemented
        perm = tuple(int(p) for p in permutation)
        return _replace(
            self,
            lax.transpose(self.q, perm),
            lax.transpose(self.scale, perm),
            axis=perm.index(self.axis),
        )

    def neg(self, /, **params):
        if params:
            return NotImplemented
        return _replace(self, self.q, -self.scale)

    def mul(self, other: ArrayLike, /, *, out_dtype=None, **params):
        """`c * (q * s) = q * (c * s)` for a scalar `c`; declines arrays."""
        c = typing.cast(Array, other)
        if params or out_dtype is not None or jnp.shape(c) != ():
            return NotImplemented
        return _replace(self, self.q, self.scale * c.astype(self.scale.dtype))

    rmul = mul

    def div(self, other: ArrayLike, /, **params):
        """`(q * s) / c = q * (s / c)` for a scalar `c`; declines arrays."""
        c = typing.cast(Array, other)
        if params or jnp.shape(c) != ():
            return NotImplemented
        return _replace(self, self.q, self.scale / c.astype(self.scale.dtype))

    def convert_element_type(self, /, *, new_dtype, weak_type, sharding, **params):
        """Converts the scales (the integers stay); declines non-floating dtypes, weak
        results and shardings."""
        if params or weak_type or sharding is not None:
            return NotImplemented
        if not jnp.issubdtype(new_dtype, jnp.floating):
            return NotImplemented
        return _replace(self, self.q, self.scale.astype(new_dtype))


# -- public functions ---------------------------------------------------------------


def quantize(
    w: ArrayLike, *, bits: int = 8, group_size: int | None = None, axis: int = -1
) -> QuantizedArray:
    """Quantize a floating array symmetrically (absmax) to int8 or packed int4.

    **Arguments:**

    - `w`: the floating array (a weight).
    - `bits`: 8 (int8, one value per byte) or 4 (int4, two values per byte).
    - `group_size`: `None` for one scale per channel (every element along `axis`
        shares it), or the number of consecutive elements along `axis` sharing a scale
        (it must divide `w.shape[axis]`, and be even for 4 bits).
    - `axis`: the axis scales are computed along: the axis a product contracts, so
        `-1` for an equinox `Linear` weight `(out, in)` and `0` for a flax `Dense`
        kernel `(in, out)`.

    **Returns:**

    A `QuantizedArray` whose `materialise()` (`dequantize`) approximates `w`: each
    element is within half a quantization step (`scale / 2`) of the original.
    """
    w = jnp.asarray(w)
    if bits not in (4, 8):
        raise ValueError(f"`quantize` takes `bits=8` or `bits=4`, got {bits!r}.")
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim == 0:
        raise ValueError(
            "`quantize` expects a floating array with at least one axis, got "
            f"{w.dtype}{list(w.shape)}."
        )
    axis = axis % w.ndim
    n = w.shape[axis]
    size = n if group_size is None else group_size
    if size < 1 or n % size or (bits == 4 and size % 2):
        raise ValueError(
            f"`quantize` got `group_size={group_size}` for an axis of length {n}: it "
            "must divide the axis length"
            + (" and be even for 4 bits." if bits == 4 else ".")
        )
    qmax = 2 ** (bits - 1) - 1
    grouped = _split_groups(w, axis, size)  # (..., groups, size, ...)
    amax = jnp.max(jnp.abs(grouped), axis=axis + 1, keepdims=True)
    scale = amax / qmax
    scale = jnp.where(scale == 0, jnp.ones_like(scale), scale)
    q = jnp.clip(jnp.round(grouped / scale), -qmax, qmax).astype(jnp.int8)
    q = q.reshape(w.shape)
    if bits == 4:
        q = _pack(q, axis)
    return QuantizedArray(
        q=q,
        scale=jnp.squeeze(scale, axis + 1).astype(w.dtype),
        bits=bits,
        axis=axis,
        group_size=size,
    )


def dequantize(w: QuantizedArray) -> Array:
    """`q * scale` as a plain array, of shape `w.shape` and dtype `w.dtype`."""
    q = _unpack(w.q, w.axis) if w.bits == 4 else w.q
    grouped = _split_groups(q, w.axis, w.group_size).astype(w.scale.dtype)
    values = grouped * jnp.expand_dims(w.scale, w.axis + 1)
    return values.reshape(q.shape)


# -- private helpers ------------------------------------------------------------------


def _logical_shape(q_shape: tuple[int, ...], bits: int, axis: int) -> tuple[int, ...]:
    if bits == 8:
        return q_shape
    return tuple(2 * d if i == axis else d for i, d in enumerate(q_shape))


def _split_groups(x: Array, axis: int, size: int) -> Array:
    """`x` with `axis` split into `(groups, size)`."""
    shape = x.shape
    return x.reshape((*shape[:axis], shape[axis] // size, size, *shape[axis + 1 :]))


def _pack(q: Array, axis: int) -> Array:
    """Two int4 values per byte along `axis`: element `2j` in the low nibble and
    `2j + 1` in the high one."""
    pairs = _split_groups(q, axis, 2)
    low = lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    high = lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
    return (low & 0x0F) | (high << 4)


def _unpack(packed: Array, axis: int) -> Array:
    """The int8 values of `_pack`, sign-extended from their nibbles."""
    low = (packed << 4) >> 4  # arithmetic shifts on int8 sign-extend
    high = packed >> 4
    pairs = jnp.stack([low, high], axis=axis + 1)
    shape = packed.shape
    return pairs.reshape((*shape[:axis], 2 * shape[axis], *shape[axis + 1 :]))


def _replace(
    w: QuantizedArray, q: Array, scale: Array, *, axis: int | None = None
) -> QuantizedArray:
    return QuantizedArray(
        q=q,
        scale=scale,
        bits=w.bits,
        axis=w.axis if axis is None else axis,
        group_size=w.group_size,
    )


def _quantized_dot(
    w: QuantizedArray,
    other: ArrayLike,
    dimension_numbers: Any,
    params: dict[str, Any],
    *,
    is_lhs: bool,
) -> Any:
    ((lhs_c, rhs_c), (lhs_b, rhs_b)) = dimension_numbers
    w_c, w_b = (lhs_c, lhs_b) if is_lhs else (rhs_c, rhs_b)
    known = {"precision", "preferred_element_type", "out_sharding"}
    if (
        not known.issuperset(params)
        or params.get("out_sharding") is not None
        or tuple(w_c) != (w.axis,)
        or w_b
    ):
        return NotImplemented
    x = typing.cast(Array, other)
    dtype = w.scale.dtype
    q = _unpack(w.q, w.axis) if w.bits == 4 else w.q
    n_groups = w.scale.shape[w.axis]
    if n_groups == 1:
        operand = q.astype(dtype)
    else:  # per-group scales vary along the contraction: scale the operand
        operand = dequantize(w)
    lhs, rhs = (operand, x) if is_lhs else (x, operand)
    out = lax.dot_general_p.bind(
        lhs, rhs, dimension_numbers=dimension_numbers, **params
    )
    if n_groups > 1:
        return out
    # Per-channel: the scales of w's free axes, placed where they land in the output.
    scale = jnp.squeeze(w.scale, w.axis).astype(out.dtype)
    n_free = scale.ndim
    positions = range(n_free) if is_lhs else range(out.ndim - n_free, out.ndim)
    return out * lax.broadcast_in_dim(scale, out.shape, tuple(positions))
