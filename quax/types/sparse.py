"""Sparse arrays in batched coordinate (BCOO) format, as in `jax.experimental.sparse`.

Linear algebra, elementwise products, sums, transposes, reshapes, slices and
reductions work on the stored entries only; anything else materialises (or, by
default, refuses to: see `BCOO.allow_materialise`).
"""

import functools as ft
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Integer, Shaped

from .._table import handler
from .._values import ArrayValue


class BCOO(ArrayValue):
    """A sparse array in batched coordinate format: `data` holds the stored entries and
    `indices` their coordinates, with the layout of `jax.experimental.sparse.BCOO`.

    An array of `shape = (*batch, *sparse, *dense)` stores `nse` entries per batch
    element: `data` has shape `(*batch, nse, *dense)` and `indices` has shape
    `(*batch, nse, n_sparse)`. Entries at the same coordinates add up. An entry with any
    coordinate out of range (such as `shape[i]`, which `fromdense` uses) is padding and
    is ignored. As in `jax.experimental.sparse`, an unstored entry is an exact zero:
    `sparse * x` is zero there even where `x` is `inf` or `nan`.

    Primitives that keep it sparse (`S`) or give a dense result without forming the
    dense operand (`D`); everything else materialises:

    | primitive | result | condition |
    |---|---|---|
    | `dot_general` sparse @ dense, dense @ sparse | D | batch dims of the BCOO are free or paired with a dense dim; dense dims of the BCOO free |
    | `dot_general` sparse @ sparse | S | `n_batch = n_dense = 0`, no batch dims in the contraction |
    | `mul` by a scalar or a dense array of the same shape | S | |
    | `div` by a scalar | S | |
    | `add`, `sub`, `add_any` sparse with sparse | S | same shape and layout |
    | `add`, `sub`, `add_any` sparse with dense | D | a scatter-add into the dense operand |
    | `neg`, `copy` | S | |
    | `convert_element_type` | S | duplicates are summed first unless to a floating or complex dtype |
    | `transpose` | S | batch, sparse and dense dims each stay in their group |
    | `reshape` | S | of the batch dims only, or of an all-sparse array |
    | `slice`, `dynamic_slice` | S | |
    | `squeeze` | S | a dense scalar when no sparse dim is left |
    | `reduce_sum` | S / D | S when no sparse axis is summed, else D |
    | `reduce_max`, `reduce_min` | D | `n_batch = n_dense = 0` |

    `scan` slices (`xs`) and stacks (`ys`) a BCOO along its leading batch dimension
    (the `unstack`/`stack` hooks), so a stack of sparse matrices can be scanned over
    without densifying it; `xs` without a batch dim materialise.
    """

    data: Shaped[Array, "..."]
    indices: Integer[Array, "*batch nse n_sparse"]
    _shape: tuple[int, ...] = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)

    def __init__(
        self,
        data: Shaped[ArrayLike, "..."],
        indices: Integer[ArrayLike, "*batch nse n_sparse"],
        shape: Sequence[int],
        allow_materialise: bool = False,
    ):
        """**Arguments:**

        - `data`: the stored entries, shape `(*batch, nse, *dense)`.
        - `indices`: their coordinates in the sparse dimensions, an integer array of
            shape `(*batch, nse, n_sparse)`.
        - `shape`: the shape of the whole array, `(*batch, *sparse, *dense)`.
        - `allow_materialise`: whether a primitive with no sparse rule may turn this
            array into a dense one. False (the default, as in the Quax library's
            example) makes that an error naming the primitive. `todense()` always works.
        """
        self.data = jnp.asarray(data)
        self.indices = jnp.asarray(indices)
        self._shape = tuple(int(d) for d in shape)
        self.allow_materialise = bool(allow_materialise)

    def __check_init__(self):
        nb = self.indices.ndim - 2
        if nb < 0:
            raise ValueError(
                "`BCOO` expects `indices` of shape (*batch, nse, n_sparse), got shape "
                f"{tuple(self.indices.shape)}."
            )
        if not jnp.issubdtype(self.indices.dtype, jnp.integer):
            raise ValueError(
                f"`BCOO` expects integer `indices`, got dtype {self.indices.dtype}."
            )
        ns = self.indices.shape[-1]
        nd = len(self._shape) - nb - ns
        expected = (*self._shape[:nb], self.indices.shape[-2], *self._shape[nb + ns :])
        if nd < 0 or tuple(self.data.shape) != expected:
            raise ValueError(
                f"`BCOO` of shape {self._shape} with `indices` of shape "
                f"{tuple(self.indices.shape)} expects `data` of shape {expected} "
                f"(*batch, nse, *dense), got {tuple(self.data.shape)}."
            )
        if tuple(self.indices.shape[:nb]) != self._shape[:nb]:
            raise ValueError(
                f"`BCOO` of shape {self._shape} expects `indices` with batch shape "
                f"{self._shape[:nb]}, got {tuple(self.indices.shape[:nb])}."
            )

    # -- layout --

    @property
    def n_batch(self) -> int:
        return self.indices.ndim - 2

    @property
    def n_sparse(self) -> int:
        return self.indices.shape[-1]

    @property
    def n_dense(self) -> int:
        return len(self._shape) - self.n_batch - self.n_sparse

    @property
    def nse(self) -> int:
        """The number of stored entries per batch element."""
        return self.indices.shape[-2]

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self._shape, self.data.dtype)

    def materialise(self) -> Array:
        if not self.allow_materialise:
            raise RuntimeError(
                f"Refusing to materialise a sparse `BCOO` of shape {self._shape} "
                "(no sparse rule for this operation). Pass `allow_materialise=True` "
                "to the `BCOO` to allow it, or call `.todense()` yourself."
            )
        return self.todense()

    def todense(self) -> Array:
        """This array as a dense one (a scatter-add of the stored entries)."""
        return _todense(self.data, self.indices, self._shape)

    @classmethod
    def fromdense(
        cls,
        mat: ArrayLike,
        *,
        nse: int | None = None,
        n_batch: int = 0,
        n_dense: int = 0,
        index_dtype: Any = jnp.int32,
        allow_materialise: bool = False,
    ) -> "BCOO":
        """The sparse form of a dense array.

        **Arguments:**

        - `mat`: the dense array.
        - `nse`: entries to store per batch element. Default: the largest number of
            nonzeros of a batch element, which needs a concrete `mat` (outside `jit`).
            With a smaller `nse`, entries past it are dropped; extra slots are padding.
        - `n_batch`, `n_dense`: how many leading (trailing) dims are batch (dense).
        - `index_dtype`: the dtype of `indices`.
        - `allow_materialise`: as in `BCOO`.

        **Returns:** a `BCOO` whose `todense()` is `mat` (when `nse` is large enough).
        """
        mat = jnp.asarray(mat)
        n_sparse = mat.ndim - n_batch - n_dense
        if n_batch < 0 or n_dense < 0 or n_sparse < 1:
            raise ValueError(
                f"`BCOO.fromdense` got n_batch={n_batch}, n_dense={n_dense} for an "
                f"array of {mat.ndim} dims; they must be non-negative and leave at "
                "least one sparse dim."
            )
        if nse is None:
            if isinstance(mat, jax.core.Tracer):
                raise ValueError(
                    "`BCOO.fromdense` needs a concrete array to count its nonzeros; "
                    "inside `jit` (or another transformation) pass `nse=...`."
                )
            nse = int(_max_nonzeros(mat, n_batch, n_dense))
        data, indices = _fromdense(mat, nse, n_batch, n_dense, jnp.dtype(index_dtype))
        return cls(data, indices, mat.shape, allow_materialise)

    def sum_duplicates(self) -> "BCOO":
        """The same array with each coordinate stored at most once (padding last)."""
        data, indices = _sum_duplicates(self.data, self.indices, self._shape)
        return self._replace(data, indices)

    # -- linear algebra --

    @handler("dot_general")
    def _dot_sparse(self, other: "BCOO", /, *, dimension_numbers, **params):
        """Sparse @ sparse: the products of every pair of entries that meet."""
        out_dtype = _dot_dtype(self, other, params)
        if out_dtype is None:
            return NotImplemented
        return _sparse_sparse(self, other, dimension_numbers, out_dtype)

    @handler("dot_general")
    def _dot_dense(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """Sparse @ dense by gathering the dense operand's rows at the stored
        coordinates and summing the products into the output's rows."""
        out_dtype = _dot_dtype(self, other, params)
        if out_dtype is None:
            return NotImplemented
        return _sparse_dense(self, jnp.asarray(other), dimension_numbers, out_dtype)

    @handler("rdot_general")
    def _rdot_dense(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """Dense @ sparse: sparse @ dense with the roles swapped, then transposed."""
        out_dtype = _dot_dtype(self, other, params)
        if out_dtype is None:
            return NotImplemented
        lhs = jnp.asarray(other)
        (lc, rc), (lb, rb) = dimension_numbers
        swapped = _sparse_dense(self, lhs, ((rc, lc), (rb, lb)), out_dtype)
        if swapped is NotImplemented:
            return NotImplemented
        nb = len(lb)
        n_sparse_free = self.ndim - len(rc) - len(rb)
        n_dense_free = lhs.ndim - len(lc) - len(lb)
        perm = (
            *range(nb),
            *range(nb + n_sparse_free, nb + n_sparse_free + n_dense_free),
            *range(nb, nb + n_sparse_free),
        )
        return jnp.transpose(swapped, perm)

    # -- elementwise --

    @handler("mul", "rmul")
    def _scale(self, other: Shaped[ArrayLike, ""], /, **params):
        """By a scalar: the entries are scaled."""
        return self._replace(self.data * other)

    @handler("mul", "rmul")
    def _mul_dense(self, other: ArrayLike, /, **params):
        """By a dense array of the same rank (broadcasting size-1 dims): its values
        are read at the stored coordinates only, and the result is sparse."""
        other = jnp.asarray(other)
        if other.ndim != self.ndim:
            return NotImplemented
        # `lax.mul` broadcasts size-1 dims; reading at the coordinates fuses with it.
        other = jnp.broadcast_to(other, self._shape)
        return self._replace(self.data * self._extract(other))

    @handler("div")
    def _div_scalar(self, other: Shaped[ArrayLike, ""], /, **params):
        return self._replace(_div(self.data, other))

    @handler("add", "radd", "add_any", "radd_any")
    def _add_sparse(self, other: "BCOO", /, **params):
        """Sparse + sparse concatenates the entries."""
        return self._concat(other, negate_other=False)

    @handler("add", "radd", "add_any", "radd_any")
    def _add_dense(self, other: ArrayLike, /, **params):
        """Sparse + dense adds the entries into the dense operand."""
        return self._scatter_into(other, negate_other=False)

    @handler("sub")
    def _sub_sparse(self, other: "BCOO", /, **params):
        return self._concat(other, negate_other=True)

    @handler("sub")
    def _sub_dense(self, other: ArrayLike, /, **params):
        return self._scatter_into(other, negate_other=True)

    @handler("rsub")
    def _rsub_dense(self, other: ArrayLike, /, **params):
        return self.neg()._scatter_into(other, negate_other=False)

    def neg(self, **params):
        return self._replace(-self.data)

    def copy(self, **params):
        return self._replace(jnp.copy(self.data))

    def convert_element_type(self, *, new_dtype, sharding=None, **params):
        if sharding is not None or new_dtype == jnp.bool_ or self.dtype == jnp.bool_:
            return NotImplemented  # bool entries do not add up
        value = self
        if not jnp.issubdtype(new_dtype, jnp.inexact):
            value = self.sum_duplicates()  # non-linear: entries must be summed first
        return value._replace(lax.convert_element_type(value.data, new_dtype))

    # -- shape --

    def transpose(self, *, permutation, **params):
        nb, ns = self.n_batch, self.n_sparse
        perm = tuple(permutation)
        if sorted(perm[:nb]) != list(range(nb)) or sorted(perm[nb : nb + ns]) != list(
            range(nb, nb + ns)
        ):
            return NotImplemented
        dense_perm = tuple(nb + 1 + p - nb - ns for p in perm[nb + ns :])
        data = jnp.transpose(self.data, (*perm[:nb], nb, *dense_perm))
        indices = jnp.transpose(self.indices, (*perm[:nb], nb, nb + 1))
        indices = indices[..., [p - nb for p in perm[nb : nb + ns]]]
        shape = tuple(self._shape[p] for p in perm)
        return BCOO(data, indices, shape, self.allow_materialise)

    def reshape(self, *, new_sizes, dimensions, sharding=None, **params):
        """Of the batch dims (the rest unchanged), or of an array with only sparse
        dims (the coordinates are linearised and split again)."""
        if dimensions is not None or sharding is not None:
            return NotImplemented
        new_sizes = tuple(int(d) for d in new_sizes)
        nb = self.n_batch
        tail = self._shape[nb:]
        if (
            len(new_sizes) >= len(tail)
            and new_sizes[len(new_sizes) - len(tail) :] == tail
        ):
            new_batch = new_sizes[: len(new_sizes) - len(tail)]
            data = self.data.reshape(*new_batch, *self.data.shape[nb:])
            indices = self.indices.reshape(*new_batch, *self.indices.shape[nb:])
            return BCOO(data, indices, new_sizes, self.allow_materialise)
        if nb or self.n_dense or not new_sizes or math.prod(self._shape) >= 2**31:
            return NotImplemented
        valid = _valid(self.indices, self._shape)
        flat = _ravel(self.indices, self._shape)
        indices = _unravel(flat, new_sizes)
        indices = jnp.where(valid[:, None], indices, _per_coord(new_sizes, indices))
        return BCOO(self.data, indices, new_sizes, self.allow_materialise)

    def slice(self, *, start_indices, limit_indices, strides, **params):
        strides = strides or (1,) * self.ndim
        nb, ns = self.n_batch, self.n_sparse
        outer = tuple(
            builtins_slice(s, e, k)
            for s, e, k in zip(start_indices, limit_indices, strides, strict=True)
        )
        data = self.data[(*outer[:nb], builtins_slice(None), *outer[nb + ns :])]
        indices = self.indices[outer[:nb]]
        starts = jnp.asarray(start_indices[nb : nb + ns], indices.dtype)
        steps = jnp.asarray(strides[nb : nb + ns], indices.dtype)
        shape = tuple(
            len(range(s, e, k))
            for s, e, k in zip(start_indices, limit_indices, strides, strict=True)
        )
        return self._shifted(data, indices, starts, steps, shape)

    def dynamic_slice(self, *starts: ArrayLike, slice_sizes, **params):
        nb, ns = self.n_batch, self.n_sparse
        sizes = tuple(int(s) for s in slice_sizes)
        # As `lax.dynamic_slice`: each start is clamped so the slice fits.
        starts = tuple(
            jnp.clip(jnp.asarray(s).astype(jnp.int32), 0, d - n)
            for s, d, n in zip(starts, self._shape, sizes, strict=True)
        )
        zero = jnp.zeros((), jnp.int32)
        data = lax.dynamic_slice(
            self.data,
            (*starts[:nb], zero, *starts[nb + ns :]),
            (*sizes[:nb], self.nse, *sizes[nb + ns :]),
        )
        indices = lax.dynamic_slice(
            self.indices,
            (*starts[:nb], zero, zero),
            (*sizes[:nb], self.nse, ns),
        )
        sparse_starts = (
            jnp.stack([s.astype(self.indices.dtype) for s in starts[nb : nb + ns]])
            if ns
            else jnp.zeros((0,), self.indices.dtype)
        )
        steps = jnp.ones((ns,), self.indices.dtype)
        return self._shifted(data, indices, sparse_starts, steps, sizes)

    def squeeze(self, *, dimensions, **params):
        nb, ns = self.n_batch, self.n_sparse
        dims = set(dimensions)
        sparse_shape = self._sparse_shape()
        indices = _invalid_to_oob(self.indices, sparse_shape)
        keep_sparse = [j for j in range(ns) if nb + j not in dims]
        data = jnp.squeeze(
            self.data,
            tuple(d for d in dims if d < nb)
            + tuple(d + 1 - ns for d in dims if d >= nb + ns),
        )
        indices = jnp.squeeze(indices, tuple(d for d in dims if d < nb))
        shape = tuple(d for i, d in enumerate(self._shape) if i not in dims)
        new_nb = nb - sum(d < nb for d in dims)
        if not keep_sparse:
            valid = _valid(indices, sparse_shape)
            return _masked(data, valid, new_nb).sum(new_nb)
        indices = indices[..., keep_sparse]
        return BCOO(data, indices, shape, self.allow_materialise)

    # -- reductions --

    def reduce_sum(self, *, axes, out_sharding=None, **params):
        """Sparse when only batch or dense axes are summed (summed batch elements
        join one longer list of entries); otherwise dense, by a scatter-add of the
        entries into the (smaller) result."""
        if out_sharding is not None:
            return NotImplemented
        nb, ns = self.n_batch, self.n_sparse
        axes = tuple(sorted(axes))
        batch_axes = tuple(a for a in axes if a < nb)
        sparse_axes = tuple(a - nb for a in axes if nb <= a < nb + ns)
        dense_axes = tuple(a + 1 - ns for a in axes if a >= nb + ns)
        data = self.data.sum(dense_axes) if dense_axes else self.data
        kept_sparse = [j for j in range(ns) if j not in sparse_axes]
        shape_no_dense = tuple(
            d for i, d in enumerate(self._shape) if i < nb + ns or i not in axes
        )
        if not sparse_axes:
            value = BCOO(data, self.indices, shape_no_dense, self.allow_materialise)
            return value._merge_batch(batch_axes)
        sparse_shape = self._sparse_shape()
        valid = _valid(self.indices, sparse_shape)
        data = _masked(data, valid, nb)
        indices = _invalid_to_oob(self.indices, sparse_shape)[..., kept_sparse]
        if kept_sparse:
            shape = (
                *self._shape[:nb],
                *(sparse_shape[j] for j in kept_sparse),
                *shape_no_dense[nb + ns :],
            )
            out = BCOO(data, indices, shape, True).todense()
        else:
            out = data.sum(nb)
        return out.sum(batch_axes) if batch_axes else out

    def reduce_max(self, *, axes, out_sharding=None, **params):
        return self._reduce_extreme(
            axes, out_sharding, jax.ops.segment_max, jnp.maximum
        )

    def reduce_min(self, *, axes, out_sharding=None, **params):
        return self._reduce_extreme(
            axes, out_sharding, jax.ops.segment_min, jnp.minimum
        )

    # -- scan: slice and stack along the leading batch dim --

    def unstack(self, length: int):
        if self.n_batch == 0:
            return None
        shape, allow = self._shape[1:], self.allow_materialise

        def rebuild(arrays):
            data, indices = arrays
            return BCOO(data, indices, shape, allow)

        return (self.data, self.indices), rebuild

    def stack(self, length: int):
        shape, allow = (length, *self._shape), self.allow_materialise

        def rebuild(arrays):
            data, indices = arrays
            return BCOO(data, indices, shape, allow)

        return (self.data, self.indices), rebuild

    # -- private --

    def _sparse_shape(self) -> tuple[int, ...]:
        return self._shape[self.n_batch : self.n_batch + self.n_sparse]

    def _replace(self, data: Array, indices: Array | None = None) -> "BCOO":
        indices = self.indices if indices is None else indices
        return BCOO(data, indices, self._shape, self.allow_materialise)

    def _extract(self, dense: Array) -> Array:
        """`dense` read at the stored coordinates: shape `(*batch, nse, *dense)`."""
        sparse_shape = self._sparse_shape()

        def one(mat, indices):
            indices = _invalid_to_oob(indices, sparse_shape)
            if not sparse_shape:
                return jnp.broadcast_to(mat, (indices.shape[0], *mat.shape))
            return mat.at[tuple(indices.T)].get(mode="fill", fill_value=0)

        return _over_batch(one, self.n_batch)(dense, self.indices)

    def _concat(self, other: "BCOO", *, negate_other: bool) -> Any:
        """Sparse +/- sparse of the same layout: one longer list of entries."""
        same = (
            other._shape == self._shape
            and other.n_batch == self.n_batch
            and other.n_dense == self.n_dense
        )
        if not same:
            return NotImplemented
        odata = -other.data if negate_other else other.data
        idtype = jnp.promote_types(self.indices.dtype, other.indices.dtype)
        nb = self.n_batch
        data = jnp.concatenate([self.data, odata.astype(self.data.dtype)], nb)
        indices = jnp.concatenate(
            [self.indices.astype(idtype), other.indices.astype(idtype)], nb
        )
        allow = self.allow_materialise or other.allow_materialise
        return BCOO(data, indices, self._shape, allow)

    def _scatter_into(self, other: ArrayLike, *, negate_other: bool) -> Array:
        """`other +/- self` as a dense array: the entries scatter-added into it."""
        other = jnp.broadcast_to(jnp.asarray(other), self._shape)
        if negate_other:
            other = -other
        sparse_shape = self._sparse_shape()

        def one(mat, data, indices):
            indices = _invalid_to_oob(indices, sparse_shape)
            if not sparse_shape:
                return mat + data.sum(0)
            return mat.at[tuple(indices.T)].add(data, mode="drop")

        return _over_batch(one, self.n_batch)(other, self.data, self.indices)

    def _shifted(
        self, data: Array, indices: Array, starts: Array, steps: Array, shape: tuple
    ) -> "BCOO":
        """Sparse coordinates mapped into a strided window; outside it is padding."""
        nb, ns = self.n_batch, self.n_sparse
        if ns:
            sizes = _per_coord(shape[nb : nb + ns], indices)
            steps = jnp.broadcast_to(steps.astype(indices.dtype), indices.shape)
            offset = indices - jnp.broadcast_to(
                starts.astype(indices.dtype), indices.shape
            )
            inside = (offset >= 0) & (offset % steps == 0) & (offset // steps < sizes)
            inside = inside & _valid(indices, self._sparse_shape())[..., None]
            keep = jnp.all(inside, -1, keepdims=True)
            indices = jnp.where(keep, offset // steps, sizes)
        return BCOO(data, indices, shape, self.allow_materialise)

    def _merge_batch(self, batch_axes: tuple[int, ...]) -> "BCOO":
        """Sum over batch axes by moving them into the list of entries."""
        if not batch_axes:
            return self
        nb = self.n_batch
        kept = [a for a in range(nb) if a not in batch_axes]
        order = (*kept, *batch_axes, nb)
        k = len(kept)
        data = jnp.moveaxis(self.data, order, range(len(order)))
        indices = jnp.moveaxis(self.indices, order, range(len(order)))
        data = data.reshape(*data.shape[:k], -1, *data.shape[len(order) :])
        indices = indices.reshape(*indices.shape[:k], -1, indices.shape[-1])
        shape = tuple(d for i, d in enumerate(self._shape) if i not in batch_axes)
        return BCOO(data, indices, shape, self.allow_materialise)

    def _reduce_extreme(self, axes, out_sharding, segment_fn, combine) -> Any:
        """`reduce_max`/`reduce_min` over sparse axes: the extreme of the stored
        entries, combined with 0 where a reduced slice has an unstored entry."""
        if out_sharding is not None or self.n_batch or self.n_dense:
            return NotImplemented
        if self.dtype == jnp.bool_ or not axes:
            return NotImplemented
        reduced = math.prod(self._shape[a] for a in axes)
        if reduced == 0:
            return NotImplemented
        value = self.sum_duplicates()
        kept = [j for j in range(self.ndim) if j not in axes]
        kept_shape = tuple(self._shape[j] for j in kept)
        n_out = math.prod(kept_shape)
        valid = _valid(value.indices, self._shape)
        seg = _ravel(value.indices, kept_shape, kept)
        seg = jnp.where(valid, seg, n_out)
        extreme = segment_fn(value.data, seg, num_segments=n_out)
        count = jax.ops.segment_sum(valid.astype(jnp.int32), seg, num_segments=n_out)
        zero = jnp.zeros((), self.dtype)
        out = jnp.where(count < reduced, combine(extreme, zero), extreme)
        return out.reshape(kept_shape)


builtins_slice = slice  # `slice` is a handler in BCOO's body


# -- kernels ------------------------------------------------------------------------
# The conversions are jitted (shapes static) so that eager calls compile once.


@ft.partial(jax.jit, static_argnums=2)
def _todense(data: Array, indices: Array, shape: tuple[int, ...]) -> Array:
    n_batch = indices.ndim - 2
    sparse_shape = shape[n_batch : n_batch + indices.shape[-1]]

    def one(data, indices):
        out = jnp.zeros(shape[n_batch:], data.dtype)
        if data.dtype == jnp.bool_:  # entries combine with `or`
            if not sparse_shape:
                return data.any(0)
            indices = _invalid_to_oob(indices, sparse_shape)
            return out.at[tuple(indices.T)].max(data, mode="drop")
        if not sparse_shape:
            return out + data.sum(0)
        indices = _invalid_to_oob(indices, sparse_shape)
        return out.at[tuple(indices.T)].add(data, mode="drop")

    return _over_batch(one, n_batch)(data, indices)


def _nonzero_mask(mat: Array, n_dense: int) -> Array:
    mask = mat != 0
    return mask.any(tuple(range(mat.ndim - n_dense, mat.ndim))) if n_dense else mask


@ft.partial(jax.jit, static_argnums=(1, 2))
def _max_nonzeros(mat: Array, n_batch: int, n_dense: int) -> Array:
    mask = _nonzero_mask(mat, n_dense)
    return jnp.max(mask.sum(tuple(range(n_batch, mask.ndim))), initial=0)


@ft.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _fromdense(mat: Array, nse: int, n_batch: int, n_dense: int, index_dtype: Any):
    n_sparse = mat.ndim - n_batch - n_dense
    sparse_shape = mat.shape[n_batch : n_batch + n_sparse]
    mask = _nonzero_mask(mat, n_dense)

    def one(mat, mask):
        idx = jnp.nonzero(mask, size=nse, fill_value=sparse_shape)
        indices = jnp.stack(idx, -1).astype(index_dtype).reshape(nse, n_sparse)
        data = mat.at[idx].get(mode="fill", fill_value=0)
        return data, indices

    return _over_batch(one, n_batch)(mat, mask)


@ft.partial(jax.jit, static_argnums=2)
def _sum_duplicates(data: Array, indices: Array, shape: tuple[int, ...]):
    n_batch = indices.ndim - 2
    sparse_shape = shape[n_batch : n_batch + indices.shape[-1]]
    one = ft.partial(_sum_duplicates_one, sparse_shape=sparse_shape)
    return _over_batch(one, n_batch)(data, indices)


def _dot_dtype(sp: BCOO, other: Any, params: dict[str, Any]) -> Any:
    """The result dtype of a `dot_general`, or None to decline: a sharded result is
    not supported. `precision` is met: products are formed elementwise at full
    precision, at least as precise as any `precision` asks for."""
    if params.get("out_sharding") is not None:
        return None
    preferred = params.get("preferred_element_type")
    if preferred is not None:
        return jnp.dtype(preferred)
    other_dtype = other.dtype if hasattr(other, "dtype") else jnp.result_type(other)
    return jnp.result_type(sp.data.dtype, other_dtype)


def _sparse_dense(sp: BCOO, rhs: Array, dimension_numbers, out_dtype) -> Any:
    """`dot_general(sp, rhs)`, or `NotImplemented` for layouts with no rule: a batch
    dim of the BCOO contracted, or a sparse or dense dim as a batch dim."""
    (lc, rc), (lb, rb) = dimension_numbers
    nb = sp.n_batch
    if any(d >= nb for d in lb) or any(d < nb for d in lc):
        return NotImplemented
    return _peel_batch(sp, rhs, tuple(lc), tuple(rc), tuple(lb), tuple(rb), out_dtype)


def _peel_batch(sp: BCOO, rhs: Array, lc, rc, lb, rb, out_dtype) -> Array:
    """The BCOO's batch dims peeled off one by one with `vmap`: dim 0 is either paired
    with a dim of `rhs` (a dot batch dim) or free."""
    if sp.n_batch == 0:
        return _dot_unbatched(sp, rhs, lc, rc, out_dtype)
    inner_shape, allow = sp._shape[1:], sp.allow_materialise

    def shift(dims):
        return tuple(d - 1 for d in dims)

    if 0 in lb:
        j = lb.index(0)
        r = rb[j]
        lb, rb = lb[:j] + lb[j + 1 :], rb[:j] + rb[j + 1 :]
        rb, rc = tuple(d - (d > r) for d in rb), tuple(d - (d > r) for d in rc)
        in_axes, out_axis = (0, 0, r), j
    else:
        in_axes, out_axis = (0, 0, None), len(lb)
    lc, lb = shift(lc), shift(lb)

    def inner(data, indices, rhs):
        value = BCOO(data, indices, inner_shape, allow)
        return _peel_batch(value, rhs, lc, rc, lb, rb, out_dtype)

    return jax.vmap(inner, in_axes=in_axes, out_axes=out_axis)(sp.data, sp.indices, rhs)


def _dot_unbatched(sp: BCOO, rhs: Array, lc, rc, out_dtype) -> Array:
    """An unbatched BCOO times a dense array: gather `rhs` at the contracted sparse
    coordinates, multiply by the entries (contracting any contracted dense dims),
    and segment-sum into the free sparse coordinates."""
    ns = sp.n_sparse
    sparse_shape = sp._sparse_shape()
    pairs = list(zip(lc, rc, strict=True))
    sc = [(a, r) for a, r in pairs if a < ns]  # contracted sparse dims
    dc = [(a - ns, r) for a, r in pairs if a >= ns]  # contracted dense dims
    free = [d for d in range(ns) if d not in lc]
    free_shape = tuple(sparse_shape[d] for d in free)
    contract_shape = tuple(sparse_shape[a] for a, _ in sc)
    valid = _valid(sp.indices, sparse_shape)
    front = [r for _, r in sc] + [r for _, r in dc]
    rhs = jnp.moveaxis(rhs, front, tuple(range(len(front))))
    rhs = rhs.reshape(math.prod(contract_shape), *rhs.shape[len(sc) :])
    rows = jnp.where(valid, _ravel(sp.indices, contract_shape, [a for a, _ in sc]), 0)
    gathered = rhs.astype(out_dtype).at[rows].get(mode="promise_in_bounds")
    data = _masked(sp.data, valid, 0).astype(out_dtype)  # (nse, *dense)
    n_dense, n_rfree = data.ndim - 1, gathered.ndim - 1 - len(dc)
    if dc:
        dense_ids = list(range(1, 1 + n_dense))
        rfree_ids = list(range(1 + n_dense, 1 + n_dense + n_rfree))
        products = jnp.einsum(
            data,
            [0, *dense_ids],
            gathered,
            [0, *(1 + d for d, _ in dc), *rfree_ids],
            [0, *(i for i in dense_ids if i - 1 not in {d for d, _ in dc}), *rfree_ids],
            precision=lax.Precision.HIGHEST,
            preferred_element_type=out_dtype,
        )
    else:
        products = data.reshape(*data.shape, *(1,) * n_rfree) * gathered.reshape(
            gathered.shape[0], *(1,) * n_dense, *gathered.shape[1:]
        )
    n_out = math.prod(free_shape)
    seg = jnp.where(valid, _ravel(sp.indices, free_shape, free), n_out)
    out = jax.ops.segment_sum(products, seg, num_segments=n_out)
    return out.reshape(*free_shape, *products.shape[1:])


def _sparse_sparse(a: BCOO, b: BCOO, dimension_numbers, out_dtype) -> Any:
    """Every pair of stored entries whose contracted coordinates agree gives one
    entry of the result (`nse = a.nse * b.nse`), as `jax.experimental.sparse` does."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or a.n_batch or b.n_batch or a.n_dense or b.n_dense:
        return NotImplemented
    a_free = [d for d in range(a.ndim) if d not in lc]
    b_free = [d for d in range(b.ndim) if d not in rc]
    va, vb = _valid(a.indices, a._shape), _valid(b.indices, b._shape)
    match = va[:, None] & vb[None, :]
    for i, j in zip(lc, rc, strict=True):
        match = match & (a.indices[:, None, i] == b.indices[None, :, j])
    data = a.data.astype(out_dtype)[:, None] * b.data.astype(out_dtype)[None, :]
    data = jnp.where(match, data, 0).reshape(-1)
    shape = (*(a._shape[d] for d in a_free), *(b._shape[d] for d in b_free))
    if not shape:
        return data.sum()
    idtype = jnp.promote_types(a.indices.dtype, b.indices.dtype)
    na, nb = a.nse, b.nse
    indices = jnp.concatenate(
        [
            jnp.broadcast_to(a.indices[:, None, a_free], (na, nb, len(a_free))),
            jnp.broadcast_to(b.indices[None, :, b_free], (na, nb, len(b_free))),
        ],
        -1,
    ).astype(idtype)
    indices = jnp.where(match[..., None], indices, _per_coord(shape, indices))
    allow = a.allow_materialise or b.allow_materialise
    return BCOO(data, indices.reshape(na * nb, len(shape)), shape, allow)


def _sum_duplicates_one(data: Array, indices: Array, sparse_shape: tuple[int, ...]):
    """One batch element: sort by linear coordinate, add up runs of equal ones."""
    nse, index_dtype = indices.shape[0], indices.dtype
    if nse == 0 or not sparse_shape:
        return data, indices
    total = math.prod(sparse_shape)
    valid = _valid(indices, sparse_shape)
    flat = jnp.where(valid, _ravel(indices, sparse_shape), total)
    order = jnp.argsort(flat)
    flat = flat[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), flat[1:] != flat[:-1]])
    seg = jnp.cumsum(starts) - 1
    data = jax.ops.segment_sum(data[order], seg, num_segments=nse)
    flat = jnp.full((nse,), total, flat.dtype).at[seg].set(flat)
    padding = flat == total
    data = jnp.where(padding.reshape(nse, *(1,) * (data.ndim - 1)), 0, data)
    indices = _unravel(flat, sparse_shape)
    indices = jnp.where(padding[:, None], _per_coord(sparse_shape, indices), indices)
    return data, indices.astype(index_dtype)


# -- coordinates ----------------------------------------------------------------------


def _valid(indices: Array, sparse_shape: Sequence[int]) -> Array:
    """Whether each entry's coordinates are all in range (else it is padding)."""
    if not sparse_shape:
        return jnp.ones(indices.shape[:-1], bool)
    bounds = _per_coord(sparse_shape, indices)
    return jnp.all((indices >= 0) & (indices < bounds), -1)


def _invalid_to_oob(indices: Array, sparse_shape: Sequence[int]) -> Array:
    """Padding entries get every coordinate out of range, so dropping a coordinate
    (squeeze, sum) keeps them padding and scatters with `mode="drop"` skip them."""
    if not sparse_shape:
        return indices
    valid = _valid(indices, sparse_shape)
    return jnp.where(valid[..., None], indices, _per_coord(sparse_shape, indices))


def _per_coord(values: Sequence[Any], like: Array) -> Array:
    """One value per coordinate (`like[..., k]`), broadcast to `like`'s shape."""
    return jnp.broadcast_to(jnp.asarray(values, like.dtype), like.shape)


def _masked(data: Array, valid: Array, nse_axis: int) -> Array:
    """`data` with padding entries zeroed (`valid` has the batch and nse axes)."""
    valid = valid.reshape(*valid.shape, *(1,) * (data.ndim - nse_axis - 1))
    return jnp.where(valid, data, jnp.zeros((), data.dtype))


def _ravel(
    indices: Array, shape: Sequence[int], cols: Sequence[int] | None = None
) -> Array:
    """Row-major linear index of in-range coordinates: `indices[..., cols[k]]` (by
    default `indices[..., k]`) is the coordinate along `shape[k]`."""
    cols = range(len(shape)) if cols is None else cols
    flat = jnp.zeros(indices.shape[:-1], indices.dtype)
    for c, d in zip(cols, shape, strict=True):
        flat = flat * d + indices[..., c]
    return flat


def _unravel(flat: Array, shape: Sequence[int]) -> Array:
    cols = []
    for d in reversed(shape):
        cols.append(flat % d)
        flat = flat // d
    return jnp.stack(cols[::-1], -1)


def _over_batch(fn: Callable, n_batch: int) -> Callable:
    """`fn` on one batch element, mapped over `n_batch` leading axes of every input."""
    for _ in range(n_batch):
        fn = jax.vmap(fn)
    return fn


def _div(x: Array, scalar: ArrayLike) -> Array:
    """`lax.div` by a scalar (integer division truncates, as the primitive does)."""
    return lax.div(x, jnp.broadcast_to(scalar, x.shape).astype(x.dtype))
