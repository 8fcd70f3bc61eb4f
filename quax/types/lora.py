"""LoRA: a weight `w` plus a trainable low-rank update `a @ b`, never formed densely.

The weight's axes are `(*batch, *rows, *cols)`; `a` is `(*batch, *rows, rank)` and `b`
is `(*batch, rank, *cols)`, so a 2-D `Linear` weight has one row and one column axis,
a conv kernel may group its input and spatial axes, and an embedding table has its
vocabulary as rows. Products (`dot_general`, `conv_general_dilated`) and lookups
(`gather`) run as the product with `w` plus thin products with the adapters;
`transpose`, slicing, `squeeze`, `neg`, `convert_element_type` and scalar `*`/`/` keep
the structure. Everything else materialises `w + a @ b` if `allow_materialise=True`,
and is an error otherwise.

`w` may itself be a value (a quantized weight: QLoRA): every operation on `w` is
dispatched again through `quaxify`, so `w`'s own handlers run.
"""

import functools as ft
import typing
from collections.abc import Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, ArrayLike, PRNGKeyArray, Shaped

from .. import _compat
from .._quaxify import quaxify
from .._values import ArrayValue, Value


_MSG_REFUSE_MATERIALISE = """\
Refusing to materialise a `LoraArray` of shape {shape} (it was made with \
`allow_materialise=False`): this operation has no low-rank rule, and running it would \
form the dense matrix `w + a @ b`.
To fix: pass `allow_materialise=True` to `quax.lora.loraify` or `LoraArray`, call \
`quax.lora.merge(model)` before this code, or express the operation as a matrix \
product with the weight."""


class LoraArray(ArrayValue):
    """A weight `w` adapted by a low-rank update: `w + scaling * a @ b`.

    `w` has axes `(*batch, *rows, *cols)` (by default one row and one column axis:
    `(*batch, n, m)`), `a` has shape `(*batch, *rows, rank)` and `b` has shape
    `(*batch, rank, *cols)`; the update is `a @ b` over the rank axis. The three parts
    are stored separately; `w` is frozen (its gradient stopped) unless
    `stop_gradient=False`. `w` may be an array or another value (e.g. a
    `quax.quantized.QuantizedArray`).

    Handles: `dot_general`/`rdot_general` (as `w·x + a·(b·x)`, never forming `a @ b`),
    `rconv_general_dilated` (a kernel whose output-feature axis, or input-feature
    axis, is a group of its own: `conv(x, w) + conv(conv(x, a'), b')`), `gather`
    (row lookups: embeddings), `dynamic_slice`, `slice`, `squeeze`, `transpose`, `neg`,
    `convert_element_type` (to floating dtypes), and `mul`/`rmul`/`div` by a scalar.
    Anything else materialises `w + scaling * a @ b` if `allow_materialise=True`, and
    raises otherwise.
    """

    w: Any
    a: Shaped[Array, "*dims rank"]
    b: Shaped[Array, "*dims"]
    scaling: float = eqx.field(static=True)
    frozen: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)

    def __init__(
        self,
        weight: Any,
        *,
        rank: int,
        scale: float = 0.01,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        key: PRNGKeyArray,
        alpha: float | None = None,
        dtype: Any = None,
        row_ndim: int = 1,
        batch_ndim: int | None = None,
    ):
        """**Arguments:**

        - `weight`: the weight to adapt (an array, or a value such as a quantized
            weight), with at least two axes.
        - `rank`: the rank of the update.
        - `scale`: `a` starts as `Normal(0, scale**2)`; `b` starts at zero, so the
            adapted weight starts equal to `weight`.
        - `allow_materialise`: if an operation has no low-rank rule, form
            `w + a @ b` densely (`True`) or raise an error (`False`, the default).
        - `stop_gradient`: freeze `weight`: no gradient flows to it.
        - `key`: a JAX PRNG key, to initialise `a`.
        - `alpha`: if given, the update is scaled by `alpha / rank` (as in the LoRA
            paper and peft); otherwise by 1.
        - `dtype`: the dtype of `a` and `b` (default: that of `weight`), e.g. float32
            adapters on bfloat16 weights.
        - `row_ndim`: how many axes (after the batch axes) form the rows of the
            low-rank view; the remaining axes are its columns. Default 1.
        - `batch_ndim`: how many leading axes are batch axes (a stack of
            independently adapted weights). Default: every axis before the last
            `row_ndim + 1`.
        """
        if not isinstance(weight, Value):
            weight = jnp.asarray(weight)
        shape = _shape(weight)
        if len(shape) < 2:
            raise ValueError(
                "`LoraArray` expects `weight` of shape (*batch, n, m), with at least "
                f"two axes, but got shape {shape}."
            )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"`LoraArray` expects a positive int `rank`, got {rank!r}."
            )
        if batch_ndim is None:
            batch_ndim = max(len(shape) - row_ndim - 1, 0)
        if row_ndim < 0 or batch_ndim < 0 or batch_ndim + row_ndim > len(shape):
            raise ValueError(
                f"`LoraArray` got `row_ndim={row_ndim}` and `batch_ndim={batch_ndim}` "
                f"for a weight of shape {shape}: they must be non-negative and leave "
                "the remaining axes as columns."
            )
        batch = shape[:batch_ndim]
        rows = shape[batch_ndim : batch_ndim + row_ndim]
        cols = shape[batch_ndim + row_ndim :]
        dtype = _dtype(weight) if dtype is None else jnp.dtype(dtype)
        self.w = weight
        self.a = (jr.normal(key, (*batch, *rows, rank), dtype=dtype) * scale).astype(
            dtype
        )
        self.b = jnp.zeros((*batch, rank, *cols), dtype=dtype)
        self.scaling = 1.0 if alpha is None else float(alpha) / rank
        self.frozen = stop_gradient
        self.allow_materialise = allow_materialise

    def __check_init__(self):
        w_shape, a_shape, b_shape = _shape(self.w), _shape(self.a), _shape(self.b)
        nb = len(a_shape) + len(b_shape) - len(w_shape) - 2
        nr = len(a_shape) - 1 - nb
        ok = len(w_shape) >= 1 and nb >= 0 and nr >= 0 and len(b_shape) - 1 - nb >= 0
        if ok:
            batch, rows, cols = w_shape[:nb], w_shape[nb : nb + nr], w_shape[nb + nr :]
            rank = a_shape[-1]
            ok = a_shape == (*batch, *rows, rank) and b_shape == (*batch, rank, *cols)
        if not ok:
            raise ValueError(
                "`LoraArray` parts must have shapes `w: (*batch, *rows, *cols)`, "
                "`a: (*batch, *rows, rank)` and `b: (*batch, rank, *cols)`; got "
                f"`w` {w_shape}, `a` {a_shape} and `b` {b_shape}."
            )

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def batch_ndim(self) -> int:
        """The number of leading batch axes."""
        return self.a.ndim + self.b.ndim - len(_shape(self.w)) - 2

    @property
    def row_ndim(self) -> int:
        """The number of row axes (after the batch axes)."""
        return self.a.ndim - 1 - self.batch_ndim

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(_shape(self.w), self.w.dtype)

    def leaf_specs(self, spec: PartitionSpec) -> "LoraArray":
        """`w` is placed as asked; `a` follows `w`'s batch and row axes and `b` its
        batch and column axes, the rank axis replicated: each shard of `w + a @ b` is
        then computed from local shards alone."""
        nb, nr = self.batch_ndim, self.row_ndim
        full = (*spec, *[None] * (len(_shape(self.w)) - len(spec)))
        batch, rows, cols = full[:nb], full[nb : nb + nr], full[nb + nr :]
        w = self.w.leaf_specs(spec) if isinstance(self.w, ArrayValue) else spec
        a = PartitionSpec(*batch, *rows, None)
        b = PartitionSpec(*batch, None, *cols)
        return eqx.tree_at(lambda x: (x.w, x.a, x.b), self, (w, a, b))

    def materialise(self) -> Shaped[Array, "..."]:
        if not self.allow_materialise:
            raise RuntimeError(_MSG_REFUSE_MATERIALISE.format(shape=_shape(self.w)))
        return self._dense(frozen=self.frozen)

    def _dense(self, *, frozen: bool) -> Shaped[Array, "..."]:
        """`w + scaling * a @ b` as a plain array (used by `merge` and `materialise`)."""
        w = lax.stop_gradient(self.w) if frozen else self.w
        update = _update(self.a, self.b, self.batch_ndim)
        if self.scaling != 1.0:
            update = update * jnp.asarray(self.scaling, update.dtype)
        w_dtype = self.w.dtype
        return _bind(lax.add_p, w, lax.convert_element_type(update, w_dtype))

    def scan_leafwise(self) -> bool:
        """A stack of adapted matrices (`w` of shape `(layers, ..., n, m)`) is scanned
        over one `LoraArray` per layer, so LoRA's handlers run in the scanned body; a
        single matrix (whose `b` has no layer axis) never is."""
        return self.batch_ndim >= 1

    def stack(self, length: int):
        """Adapted matrices from every step of a scan stack leaf by leaf into one
        `LoraArray` with a leading axis (`w`, `a` and `b` each stacked), also when
        each step's matrix is 2-D."""
        leaves, treedef = jtu.tree_flatten(self)
        return leaves, ft.partial(jtu.tree_unflatten, treedef)

    # -- products --

    def dot_general(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`(w + a b)·x` as `w·x + a·(b·x)` (or `(a·x)·b` when only rows are
        contracted); declines when neither rows nor columns are contracted."""
        if _unknown(params, _DOT_PARAMS):
            return NotImplemented
        return _lora_dot(self, other, dimension_numbers, params, lora_is_lhs=True)

    def rdot_general(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`x·(w + a b)`: self is operand 1 here."""
        if _unknown(params, _DOT_PARAMS):
            return NotImplemented
        return _lora_dot(self, other, dimension_numbers, params, lora_is_lhs=False)

    def rconv_general_dilated(self, lhs: ArrayLike, /, **params):
        """`conv(x, w + a b)` (self is the kernel) as `conv(x, w)` plus a convolution
        with the adapter holding the input-feature and spatial axes and a pointwise
        product with the one holding the output features (or the other way round);
        declines grouped convolutions and kernels whose groups mix both features."""
        # Imported here: `_lora_layers` imports this module's helpers.
        from ._lora_layers import lora_conv

        return lora_conv(self, typing.cast(Array, lhs), params)

    # -- indexing and shape --

    def gather(self, indices: ArrayLike, /, *, dimension_numbers, **params):
        """A lookup of rows (an embedding): `w[i] + a[i] @ b`, a plain array; declines
        gathers that index columns or batch axes."""
        from ._lora_layers import lora_gather

        return lora_gather(self, typing.cast(Array, indices), dimension_numbers, params)

    def dynamic_slice(self, *starts: ArrayLike, slice_sizes, **params):
        """Slices `w`, `a` (batch and rows) and `b` (batch and columns) alike."""
        if params:
            return NotImplemented
        starts_ = [typing.cast(Array, s) for s in starts]
        nb, nr = self.batch_ndim, self.row_ndim
        zero = jnp.zeros((), starts_[0].dtype) if starts_ else 0
        sizes = tuple(slice_sizes)
        w = _bind(lax.dynamic_slice_p, self.w, *starts_, slice_sizes=sizes)
        a = lax.dynamic_slice(
            self.a, [*starts_[: nb + nr], zero], (*sizes[: nb + nr], self.rank)
        )
        b = lax.dynamic_slice(
            self.b,
            [*starts_[:nb], zero, *starts_[nb + nr :]],
            (*sizes[:nb], self.rank, *sizes[nb + nr :]),
        )
        return _replace(self, w, a, b)

    def slice(self, /, *, start_indices, limit_indices, strides, **params):
        """Slices `w`, `a` (batch and rows) and `b` (batch and columns) alike."""
        if params:
            return NotImplemented
        nb, nr, r = self.batch_ndim, self.row_ndim, self.rank
        starts, limits = tuple(start_indices), tuple(limit_indices)
        steps = (1,) * len(starts) if strides is None else tuple(strides)
        w = _bind(
            lax.slice_p,
            self.w,
            start_indices=starts,
            limit_indices=limits,
            strides=strides,
        )
        a = lax.slice(
            self.a,
            (*starts[: nb + nr], 0),
            (*limits[: nb + nr], r),
            (*steps[: nb + nr], 1),
        )
        b = lax.slice(
            self.b,
            (*starts[:nb], 0, *starts[nb + nr :]),
            (*limits[:nb], r, *limits[nb + nr :]),
            (*steps[:nb], 1, *steps[nb + nr :]),
        )
        return _replace(self, w, a, b)

    def squeeze(self, /, *, dimensions, **params):
        """Drops unit axes from the parts; if the rows or the columns are all
        dropped (an embedding row), the result is the plain array `w + a @ b`, of
        the squeezed size."""
        if params:
            return NotImplemented
        nb, nr = self.batch_ndim, self.row_ndim
        dims = set(int(d) for d in dimensions)
        w = _bind(lax.squeeze_p, self.w, dimensions=tuple(sorted(dims)))
        a_dims = tuple(d for d in sorted(dims) if d < nb + nr)
        b_dims = tuple(d for d in sorted(dims) if d < nb)
        b_dims += tuple(d - nr + 1 for d in sorted(dims) if d >= nb + nr)
        a, b = lax.squeeze(self.a, a_dims), lax.squeeze(self.b, b_dims)
        out = _replace(self, w, a, b)
        new_nb = nb - sum(d < nb for d in dims)
        if a.ndim - new_nb > 1 and b.ndim - new_nb > 1:
            return out
        return out._dense(frozen=self.frozen)

    def transpose(self, /, *, permutation, **params):
        """Permutes the batch axes among themselves and the rows and columns within
        their groups, and may swap the two groups (`(a b)^T = b^T a^T`); declines
        permutations that mix groups."""
        nb, nr, k = self.batch_ndim, self.row_ndim, len(_shape(self.w))
        perm = tuple(int(p) for p in permutation)
        if params:
            return NotImplemented
        batch, rest = perm[:nb], perm[nb:]
        rows, cols = set(range(nb, nb + nr)), set(range(nb + nr, k))
        if set(batch) != set(range(nb)):
            return NotImplemented
        w = _bind(lax.transpose_p, self.w, permutation=perm)
        if set(rest[:nr]) == rows:  # groups keep their order
            a = lax.transpose(self.a, (*batch, *rest[:nr], nb + nr))
            b_perm = (*batch, nb, *(p - nr + 1 for p in rest[nr:]))
            return _replace(self, w, a, lax.transpose(self.b, b_perm))
        nc = k - nb - nr
        if set(rest[:nc]) == cols:  # columns first: the new a is b transposed
            a = lax.transpose(self.b, (*batch, *(p - nr + 1 for p in rest[:nc]), nb))
            b = lax.transpose(self.a, (*batch, nb + nr, *rest[nc:]))
            return _replace(self, w, a, b)
        return NotImplemented

    # -- elementwise --

    def neg(self, /, **params):
        if params:
            return NotImplemented
        return _replace(self, _bind(lax.neg_p, self.w), -self.a, self.b)

    def mul(self, other: ArrayLike, /, *, out_dtype=None, **params):
        """`c * (w + a b) = c w + (c a) b` for a scalar `c`; declines arrays and a
        known non-finite `c` (`inf * (w + a b)` is not `inf * w + (inf * a) b` where
        `a b` has zeros). A traced `c` is assumed finite."""
        c = typing.cast(Array, other)
        if params or (out_dtype is not None and out_dtype != self.dtype):
            return NotImplemented
        if jnp.shape(c) != () or _known(c, lambda v: not np.isfinite(v)):
            return NotImplemented
        # The frozen weight is scaled after its gradient is stopped, so the gradient
        # still reaches `c` (and never `w`): the result holds no frozen weight.
        w = _bind(lax.mul_p, _frozen(self), _cast(c, self.w.dtype), out_dtype=None)
        a = self.a * _cast(c, self.a.dtype)
        return _replace(self, w, a, self.b, frozen=False)

    rmul = mul

    def div(self, other: ArrayLike, /, **params):
        """`(w + a b) / c = w / c + (a / c) b` for a scalar `c`; declines arrays and a
        known zero `c`. A traced `c` is assumed non-zero."""
        c = typing.cast(Array, other)
        if params or jnp.shape(c) != () or _known(c, lambda v: v == 0):
            return NotImplemented
        w = _bind(lax.div_p, _frozen(self), _cast(c, self.w.dtype))
        a = self.a / _cast(c, self.a.dtype)
        return _replace(self, w, a, self.b, frozen=False)

    def convert_element_type(self, /, *, new_dtype, weak_type, sharding, **params):
        """Converts `w`; the adapters keep their own (floating) dtype. Declines
        non-floating dtypes, weak results and shardings."""
        if params or weak_type or sharding is not None:
            return NotImplemented
        if not jnp.issubdtype(new_dtype, jnp.floating):
            return NotImplemented
        w = _bind(
            lax.convert_element_type_p,
            self.w,
            new_dtype=new_dtype,
            weak_type=False,
            sharding=None,
        )
        return _replace(self, w, self.a, self.b)

    # -- one kind for two (ArrayValue.join): where a `cond` or a loop disagrees --

    def lift_tangent(self, tangent: Any) -> "LoraArray | None":
        """A dense tangent rides on `w` (the adapters do not move); None when `w`
        is frozen (its gradient is stopped) or itself a value."""
        if self.frozen or isinstance(self.w, Value):
            return None
        return _replace(self, tangent, None, None)  # pyright: ignore[reportArgumentType]

    def join(self, other: Any) -> "LoraArray | None":
        """A plain array `x` becomes `LoraArray(w=x, a=0, b=0)` and another
        `LoraArray` stays itself, both not `frozen` unless both already are: a frozen
        weight's gradient is stopped in its `w` instead, so `x` keeps its gradient.
        Declines a quantized `w`, and a `LoraArray` of another rank, scaling,
        `allow_materialise` setting or dtypes."""
        if isinstance(self.w, Value):
            return None
        if isinstance(other, LoraArray):
            same = (
                not isinstance(other.w, Value)
                and other.scaling == self.scaling
                and other.allow_materialise == self.allow_materialise
                and _shape(other.w) == _shape(self.w)
                and other.w.dtype == self.w.dtype
                and other.a.shape == self.a.shape
                and other.b.shape == self.b.shape
                and other.a.dtype == self.a.dtype
                and other.b.dtype == self.b.dtype
            )
            if not same:
                return None
            if other.frozen == self.frozen:
                return other
            return _replace(other, _frozen(other), other.a, other.b, frozen=False)
        if isinstance(other, Value):
            return None
        x = typing.cast(Array, other)
        if _shape(x) != _shape(self.w) or jnp.result_type(x) != self.w.dtype:
            return None
        a = jnp.zeros(self.a.shape, self.a.dtype)
        b = jnp.zeros(self.b.shape, self.b.dtype)
        return _replace(self, jnp.asarray(x), a, b, frozen=False)

    # -- derivatives (ArrayValue.pushforward/pullback): low rank, never `w + a @ b` --

    def pushforward(self, tangent: "LoraArray") -> Array:
        """`dw + s (da b + a db)` (`dw` dropped when `w` is frozen)."""
        update = jnp.matmul(tangent.a, self.b) + jnp.matmul(self.a, tangent.b)
        if self.scaling != 1.0:
            update = update * jnp.asarray(self.scaling, update.dtype)
        update = update.astype(_dtype(self.w))
        if self.frozen:
            return update
        if isinstance(self.w, ArrayValue):
            return self.w.pushforward(tangent.w) + update
        return tangent.w + update

    def pullback(self, cotangent: Array) -> "LoraArray":
        """`(ct, s ct bᵀ, s aᵀ ct)`, with no cotangent for a frozen `w`."""
        ct = cotangent.astype(self.a.dtype)
        if self.scaling != 1.0:
            ct = ct * jnp.asarray(self.scaling, ct.dtype)
        ct_a = jnp.matmul(ct, jnp.swapaxes(self.b, -1, -2))
        ct_b = jnp.matmul(jnp.swapaxes(self.a, -1, -2), ct)
        if self.frozen:  # no cotangent for any leaf of `w` (a quantized one has two)
            ct_w = [None] * len(jtu.tree_leaves(self.w))
        elif isinstance(self.w, ArrayValue):
            ct_w = jtu.tree_leaves(
                self.w.pullback(cotangent), is_leaf=lambda c: c is None
            )
        else:
            ct_w = [cotangent]
        return jtu.tree_unflatten(jtu.tree_structure(self), [*ct_w, ct_a, ct_b])


# -- helpers shared with `_lora_conv` ---------------------------------------------------


def _bind(prim: Any, *operands: Any, **params: Any) -> Any:
    """`prim.bind(*operands, **params)`, dispatched again through `quaxify` when an
    operand (the frozen weight) is itself a value, so its own handlers run."""
    if any(isinstance(x, Value) for x in operands):
        return quaxify(prim.bind)(*operands, **params)
    return prim.bind(*operands, **params)


def _update(a: Array, b: Array, batch_ndim: int) -> Array:
    """`a @ b` over the rank axis: shape `(*batch, *rows, *cols)`."""
    nb = batch_ndim
    return lax.dot_general(
        a, b, (((a.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    )


_DOT_PARAMS = frozenset({"precision", "preferred_element_type", "out_sharding"})


def _unknown(params: dict[str, Any], known: frozenset[str]) -> bool:
    """Whether `params` holds a parameter this module does not know how to honour
    (a newer JAX's): the handler then declines rather than ignore it."""
    return not known.issuperset(params)


def _known(x: Array, test: Any) -> bool:
    """Whether the scalar `x` is concrete and `test(value)` holds."""
    if isinstance(x, jax.core.Tracer):
        return False
    return bool(test(np.asarray(x)))


def _frozen(lora: LoraArray) -> Any:
    """`w`, with its gradient stopped if it is frozen."""
    return lax.stop_gradient(lora.w) if lora.frozen else lora.w


def _replace(
    lora: LoraArray, w: Any, a: Array, b: Array, *, frozen: bool | None = None
) -> LoraArray:
    """A `LoraArray` with new parts and the same static settings (`frozen` may be
    changed), built without `__init__`, which makes new adapters."""
    out = object.__new__(LoraArray)
    for name, value in (
        ("w", w),
        ("a", a),
        ("b", b),
        ("scaling", lora.scaling),
        ("frozen", lora.frozen if frozen is None else frozen),
        ("allow_materialise", lora.allow_materialise),
    ):
        object.__setattr__(out, name, value)
    return out


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _dtype(x: Any) -> Any:
    return getattr(x, "dtype", None) or jnp.result_type(x)


def _cast(x: ArrayLike, dtype: Any) -> Array:
    return lax.convert_element_type(x, dtype)


def _precisions(precision: Any, lora_is_lhs: bool) -> tuple[Any, Any]:
    """`(lora side, other side)` of a `dot_general` or conv `precision` parameter
    (None or a pair; a dot algorithm is declined before this is called)."""
    if precision is None:
        return None, None
    return (precision[0], precision[1]) if lora_is_lhs else (precision[1], precision[0])


def _pair(first: Any, second: Any) -> Any:
    """A `precision` argument for an adapter product from its operands' sides."""
    return None if first is None and second is None else (first, second)


def _declines_precision(precision: Any) -> bool:
    """A dot algorithm (not a per-operand pair) fixes the operand dtypes, which the
    adapter products do not share: decline it."""
    return precision is not None and not isinstance(precision, tuple)


def _update_dtype(lora: LoraArray, x: Array, preferred: Any) -> Any:
    """The dtype the adapter products run in: that of `a` and `x` promoted, and
    the requested accumulation dtype if there is one."""
    dtype = jnp.promote_types(lora.a.dtype, x.dtype)
    return dtype if preferred is None else jnp.promote_types(dtype, preferred)


# -- dot_general ------------------------------------------------------------------------


Label = Hashable


def _lora_dot(
    lora: LoraArray,
    other: ArrayLike,
    dimension_numbers: Any,
    params: dict[str, Any],
    *,
    lora_is_lhs: bool,
) -> Any:
    """`dot_general` with `lora` on one side, as a product with `w` plus two thin
    products with the adapters, contracting `x` against the adapter on the side of a
    contracted column (else row) axis first."""
    preferred = params.get("preferred_element_type")
    if params.get("out_sharding") is not None:
        return NotImplemented
    if preferred is not None and not jnp.issubdtype(preferred, jnp.inexact):
        return NotImplemented
    if _declines_precision(params.get("precision")):
        return NotImplemented
    ((lhs_c, rhs_c), (lhs_b, rhs_b)) = dimension_numbers
    if lora_is_lhs:
        lora_c, x_c, lora_b, x_b = lhs_c, rhs_c, lhs_b, rhs_b
    else:
        lora_c, x_c, lora_b, x_b = rhs_c, lhs_c, rhs_b, lhs_b
    x = typing.cast(Array, other)  # handlers receive JAX arrays (see _dispatch)
    nb, nr, k = lora.batch_ndim, lora.row_ndim, len(_shape(lora.w))
    if lora.a.ndim == 2 and lora.b.ndim == 2 and not lora_b and len(lora_c) == 1:
        return _lora_dot_2d(lora, x, lora_c[0], x_c[0], params, lora_is_lhs)
    rows, cols = range(nb, nb + nr), range(nb + nr, k)
    if any(i in lora_c for i in cols):
        first, second = "b", "a"
    elif any(i in lora_c for i in rows):
        first, second = "a", "b"
    else:
        return NotImplemented  # no row or column contracted: the update is formed

    # One label per axis; paired axes share the lora side's label.
    lora_labels: list[Label] = [("lora", i) for i in range(k)]
    x_labels: list[Label] = [("x", j) for j in range(x.ndim)]
    for i, j in zip((*lora_c, *lora_b), (*x_c, *x_b), strict=True):
        x_labels[j] = lora_labels[i]
    batch = [lora_labels[i] for i in lora_b]
    lora_free = [lab for lab in lora_labels if lab not in x_labels]
    x_free = [lab for lab in x_labels if lab not in lora_labels]
    out_labels = batch + (lora_free + x_free if lora_is_lhs else x_free + lora_free)

    rank_label: Label = ("rank",)
    labels = {
        "a": lora_labels[: nb + nr] + [rank_label],
        "b": lora_labels[:nb] + [rank_label] + lora_labels[nb + nr :],
    }
    lhs, rhs = (_frozen(lora), x) if lora_is_lhs else (x, _frozen(lora))
    dense = _bind(
        lax.dot_general_p, lhs, rhs, dimension_numbers=dimension_numbers, **params
    )

    dtype = _update_dtype(lora, x, preferred)
    adapters = {"a": _cast(lora.a, dtype), "b": _cast(lora.b, dtype)}
    p_lora, p_x = _precisions(params.get("precision"), lora_is_lhs)
    keep = set(out_labels) | set(labels[second])
    t_labels = [lab for lab in _unique(labels[first] + x_labels) if lab in keep]
    t = _contract(
        adapters[first],
        labels[first],
        _cast(x, dtype),
        x_labels,
        t_labels,
        _pair(p_lora, p_x),
    )
    if lora.scaling != 1.0:
        t = t * jnp.asarray(lora.scaling, t.dtype)
    update = _contract(
        adapters[second], labels[second], t, t_labels, out_labels, _pair(p_lora, p_x)
    )
    return dense + _cast(update, dense.dtype)


def _lora_dot_2d(
    lora: LoraArray,
    x: Array,
    lora_axis: int,
    x_axis: int,
    params: dict[str, Any],
    lora_is_lhs: bool,
) -> Array:
    """The common case, `W @ x`, `x @ W` and their transposes, for a 2-D `LoraArray`
    and one contracted axis: the same result as the general path, with the
    primitives bound directly (this runs once per linear layer on every trace, so
    it skips `lax`'s wrappers: the operands are already checked by the equation
    being handled, and `params` holds exactly the parameters this JAX expects)."""
    w = _frozen(lora)
    lhs, rhs = (w, x) if lora_is_lhs else (x, w)
    contract = ((lora_axis,), (x_axis,)) if lora_is_lhs else ((x_axis,), (lora_axis,))
    dense = _bind(
        lax.dot_general_p, lhs, rhs, dimension_numbers=(contract, ((), ())), **params
    )
    dtype = _update_dtype(lora, x, params.get("preferred_element_type"))
    p_lora, p_x = _precisions(params.get("precision"), lora_is_lhs)
    x, a, b = (
        _same_dtype(x, dtype),
        _same_dtype(lora.a, dtype),
        _same_dtype(lora.b, dtype),
    )
    # `first` meets x; `second` then meets the rank axis of the thin product.
    if lora_axis == 1:  # m contracted: (b x), then a
        first, first_axis, second, second_axis = b, 1, a, 1
    else:  # n contracted: (a x), then b
        first, first_axis, second, second_axis = a, 0, b, 0

    # Inside `shard_map`, `lax`'s wrappers also match the operands' varying manual
    # axes (an adapter may vary where `x` does not): bind directly only outside.
    direct = not any(_varying(v) for v in (x, a, b))

    def dot(u, v, cu, cv, precision):
        dims = (((cu,), (cv,)), ((), ()))
        if not direct:
            return lax.dot_general(
                u, v, dims, precision=precision, preferred_element_type=dtype
            )
        return lax.dot_general_p.bind(
            u,
            v,
            **dict(
                params,
                dimension_numbers=dims,
                precision=precision,
                preferred_element_type=dtype,
            ),
        )

    if lora_is_lhs:
        t = dot(first, x, first_axis, x_axis, _pair(p_lora, p_x))  # (rank, *x_free)
        update = dot(second, t, second_axis, 0, _pair(p_lora, p_x))
    else:
        t = dot(x, first, x_axis, first_axis, _pair(p_x, p_lora))  # (*x_free, rank)
        update = dot(t, second, t.ndim - 1, second_axis, _pair(p_x, p_lora))
    if lora.scaling != 1.0:
        update = update * jnp.asarray(lora.scaling, update.dtype)
    update = _same_dtype(update, dense.dtype)
    if direct and not _varying(dense):
        return lax.add_p.bind(dense, update)
    return lax.add(dense, update)


def _varying(x: Any) -> bool:
    """Whether `x` varies over manual mesh axes (inside `shard_map`)."""
    return bool(_compat.varying_axes(jax.typeof(x)))


def _same_dtype(x: Array, dtype: Any) -> Array:
    """`x` in `dtype`, with no call into `lax` when it already is."""
    return x if x.dtype == dtype else _cast(x, dtype)


def _unique(labels: Sequence[Label]) -> list[Label]:
    return list(dict.fromkeys(labels))


def _contract(
    x: Array,
    x_labels: Sequence[Label],
    y: Array,
    y_labels: Sequence[Label],
    out_labels: Sequence[Label],
    precision: Any,
) -> Array:
    """`einsum` of two labelled operands with one `dot_general` (shared labels that
    are kept are batch axes, the others contracted), then a transpose into
    `out_labels` order."""
    keep = set(out_labels)
    x, x_labels = _sum_out(x, x_labels, keep | set(y_labels))
    y, y_labels = _sum_out(y, y_labels, keep | set(x_labels))
    shared = [lab for lab in x_labels if lab in y_labels]
    batch = [lab for lab in shared if lab in keep]
    contract = [lab for lab in shared if lab not in keep]
    dimension_numbers = (
        (_positions(x_labels, contract), _positions(y_labels, contract)),
        (_positions(x_labels, batch), _positions(y_labels, batch)),
    )
    out = lax.dot_general(
        x, y, dimension_numbers, precision=precision, preferred_element_type=x.dtype
    )
    got = batch + [lab for lab in x_labels if lab not in y_labels]
    got += [lab for lab in y_labels if lab not in x_labels]
    perm = tuple(got.index(lab) for lab in out_labels)
    if perm != tuple(range(len(perm))):
        out = lax.transpose(out, perm)
    return out


def _positions(labels: Sequence[Label], which: Sequence[Label]) -> tuple[int, ...]:
    return tuple(labels.index(lab) for lab in which)


def _sum_out(
    x: Array, labels: Sequence[Label], needed: set[Label]
) -> tuple[Array, list[Label]]:
    drop = tuple(i for i, lab in enumerate(labels) if lab not in needed)
    if drop:
        x = jnp.sum(x, axis=drop)
    return x, [lab for lab in labels if lab in needed]
