"""Arrays with named axes: `NamedArray(array, axes)`, aligned by name while tracing.

JAX traces a program positionally; a `NamedArray` checks and, where the positional
shapes allow it, corrects that program by name: elementwise operands are transposed
and broadcast so that equal names meet, contractions pair axes of the same name, and
shape primitives carry the names along. Names that cannot line up are an error, never
a silent positional broadcast.
"""

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import jax.lax as lax
import numpy as np
from jaxtyping import Array, ArrayLike

from .._table import handler
from .._values import ArrayValue


P = jexc.primitives


class AxisNameError(ValueError):
    """Raised when axis names do not line up."""


@dataclasses.dataclass(frozen=True)
class Broadcast:
    """The name of an axis made by broadcasting: the array is constant along it, so
    it lines up with any name (it is re-broadcast there)."""

    index: int

    def __repr__(self) -> str:
        return f"<broadcast {self.index}>"


@dataclasses.dataclass(frozen=True)
class Positional:
    """The name of an axis that met a plain array positionally: it has data but no
    name, so it never moves (realigning it is an error)."""

    index: int

    def __repr__(self) -> str:
        return f"<positional {self.index}>"


def _fresh(kind: type, taken: Sequence[Any], n: int) -> list[Any]:
    """`n` markers of `kind` not among `taken`."""
    used = {a.index for a in taken if isinstance(a, kind)}
    out, i = [], 0
    while len(out) < n:
        if i not in used:
            out.append(kind(i))
        i += 1
    return out


def _is_name(axis: Any) -> bool:
    return not isinstance(axis, Broadcast | Positional)


def _is_realignable(axis: Any) -> bool:
    """A name or a broadcast axis moves freely; a `Positional` one never does."""
    return not isinstance(axis, Positional)


# -- elementwise alignment ----------------------------------------------------------------


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(jax.typeof(x).shape)


def _layout(named: Sequence["NamedArray"], shape: tuple[int, ...], what: str) -> list:
    """The axes of the result of an elementwise `what` on `named` operands of the
    traced `shape`: every real name once, each where the operands put it if free."""
    layout = list(named[0].axes)
    for x in named[1:]:
        for pos, name in enumerate(x.axes):
            if not _is_name(name) or name in layout:
                continue
            if _is_name(layout[pos]):
                raise AxisNameError(
                    f"quax: `{what}` of named arrays with axes {named[0].axes} and "
                    f"{x.axes}: axis {name!r} has no place in the result (JAX computes "
                    f"shape {shape}, and position {pos} is {layout[pos]!r}).\n"
                    "To fix: rename the axes (`x.rename(...)`) or broadcast explicitly "
                    "so that the names line up."
                )
            layout[pos] = name
    return layout


def _moved_off_data(
    named: Sequence["NamedArray"], layout: Sequence[Any], shape: tuple[int, ...]
) -> Any:
    """A name that realigning would move away from a position where JAX's result
    varies and no name takes over (`outer(v, v)` with `v` named `b`): the positional
    program and the names disagree. None if there is no such name."""
    for x in named:
        for pos, name in enumerate(x.axes):
            if not _is_name(name) or layout[pos] == name:
                continue
            if not _is_name(layout[pos]) and shape[pos] != 1:
                return name
    return None


def _realign(x: "NamedArray", layout: Sequence[Any], shape: tuple[int, ...], what: str):
    """`x`'s array arranged as `layout` (of `shape`): its broadcast axes dropped, its
    named axes transposed to their places, and broadcast over the rest."""
    if tuple(x.axes) == tuple(layout):
        return x.array
    for axis in x.axes:
        if isinstance(axis, Positional):
            raise AxisNameError(
                f"quax: `{what}` would move an unnamed axis of a named array with axes "
                f"{x.axes} (it met a plain array positionally).\n"
                "To fix: give every axis a name before mixing names in a new order."
            )
    core = x.array
    kept = []
    for pos in reversed(range(len(x.axes))):
        if isinstance(x.axes[pos], Broadcast):
            core = lax.index_in_dim(core, 0, pos, keepdims=False)
        else:
            kept.insert(0, x.axes[pos])
    order = sorted(range(len(kept)), key=lambda i: layout.index(kept[i]))
    core = lax.transpose(core, tuple(order))
    dims = tuple(layout.index(kept[i]) for i in order)
    for i, d in zip(order, dims, strict=True):
        size = _shape(x.array)[x.axes.index(kept[i])]
        if size != shape[d]:
            raise AxisNameError(
                f"quax: `{what}`: axis {kept[i]!r} has size {size} in one operand and "
                f"{shape[d]} in the result.\nTo fix: use the same size for the same name."
            )
    return lax.broadcast_in_dim(core, shape, dims)


def _check_sizes(x: "NamedArray", shape: tuple[int, ...], what: str) -> None:
    """A named axis is never stretched positionally (size 1 to `n`)."""
    for axis, size, want in zip(x.axes, _shape(x.array), shape, strict=True):
        if _is_name(axis) and size != want:
            raise AxisNameError(
                f"quax: `{what}`: axis {axis!r} has size {size} in one operand and "
                f"{want} in the result.\nTo fix: use the same size for the same name."
            )


def _elementwise(prim: jexc.Primitive, operands: Sequence[Any], params: dict) -> Any:
    """`prim` on operands of which at least one is named, aligned by name."""
    shapes = [_shape(x.array if isinstance(x, NamedArray) else x) for x in operands]
    shape = tuple(np.broadcast_shapes(*shapes))  # lax broadcasts size-1 axes
    named = [x for x in operands if isinstance(x, NamedArray)]
    full = [x for x in named if len(x.axes) == len(shape)]
    plain = [x for x in operands if not isinstance(x, NamedArray) and _shape(x)]
    like = named[0]
    if not full or all(x.axes == full[0].axes for x in full):
        layout = list(full[0].axes) if full else [None] * len(shape)
        if plain:  # data along broadcast axes now: they become positional
            taken = [a for a in layout if a is not None]
            fresh = iter(_fresh(Positional, taken, len(layout)))
            layout = [
                next(fresh) if a is None or isinstance(a, Broadcast) else a
                for a in layout
            ]
        for x in full:
            _check_sizes(x, shape, prim.name)
        arrays = [x.array if isinstance(x, NamedArray) else x for x in operands]
    else:
        if plain:
            if like.allow_materialise:
                return NotImplemented  # the positional result, without names
            raise AxisNameError(
                f"quax: `{prim.name}` of named arrays whose axes differ "
                f"({', '.join(str(x.axes) for x in full)}) and a plain array of shape "
                f"{_shape(plain[0])}: which name each plain axis has is "
                "ambiguous.\nTo fix: wrap the plain array as a `NamedArray`."
            )
        layout = _layout(full, shape, prim.name)
        clash = _moved_off_data(full, layout, shape)
        if clash is not None:
            if like.allow_materialise:
                return NotImplemented  # the positional result, without names
            raise AxisNameError(
                f"quax: `{prim.name}` of named arrays with axes "
                f"{', '.join(str(x.axes) for x in full)}: JAX's result (shape {shape}) "
                f"varies along two positions that both carry axis {clash!r}.\n"
                "To fix: rename one of them (`x.rename(...)`), e.g. for an outer "
                "product of an axis with itself."
            )
        if like.allow_materialise and any(
            tuple(x.axes) != tuple(layout) and not all(map(_is_realignable, x.axes))
            for x in full
        ):
            return NotImplemented  # an unnamed axis would move: the positional result
        arrays = [
            _realign(x, layout, shape, prim.name)
            if x in full
            else getattr(x, "array", x)
            for x in operands
        ]
    return like._with(prim.bind(*arrays, **params), layout)


def _nary(prim: jexc.Primitive) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """`(handler, reflected handler)` for an elementwise primitive."""

    def forward(self: "NamedArray", *others: Any, **params: Any) -> Any:
        return _elementwise(prim, (self, *others), params)

    def reflected(self: "NamedArray", other: Any, /, **params: Any) -> Any:
        return _elementwise(prim, (other, self), params)

    forward.__doc__ = reflected.__doc__ = f"`{prim.name}`, aligned by name."
    return forward, reflected


def _unary(prim: jexc.Primitive) -> Callable[..., Any]:
    """The handler for a primitive that keeps every axis where it is."""

    def handler(self: "NamedArray", /, **params: Any) -> Any:
        return self._with(prim.bind(self.array, **params), self.axes)

    handler.__doc__ = f"`{prim.name}`: the same axes."
    return handler


def _along(prim: jexc.Primitive) -> Callable[..., Any]:
    """The handler for a primitive that keeps its axes and takes plain index or size
    operands (`slice`, `dynamic_slice`, `cumsum`, `pad` by a scalar, ...)."""

    def handler(self: "NamedArray", *operands: ArrayLike, **params: Any) -> Any:
        return self._with(prim.bind(self.array, *operands, **params), self.axes)

    handler.__doc__ = f"`{prim.name}`: the same axes."
    return handler


def _reduction(prim: jexc.Primitive) -> Callable[..., Any]:
    """The handler for a reduction over `axes`: those names go."""

    def handler(self: "NamedArray", /, *, axes: Sequence[int], **params: Any) -> Any:
        out = prim.bind(self.array, axes=axes, **params)
        kept = tuple(a for i, a in enumerate(self.axes) if i not in axes)
        return self._with(out, kept)

    handler.__doc__ = f"`{prim.name}`: the reduced axes' names go."
    return handler


# -- the type -------------------------------------------------------------------------------


class NamedArray(ArrayValue):
    """An array whose every axis has a name (any hashable: a string, an `Axis`).

    | primitive | names |
    |---|---|
    | elementwise: `add`, `sub`, `mul`, `div`, `max`, `min`, `pow`, `rem`, `atan2`, comparisons, `and`/`or`/`xor`, `select_n` (`jnp.where`) and `clamp` at any position | operands transposed and broadcast so that equal names meet; a name with no place in JAX's result shape is an error |
    | unary elementwise (`neg`, `exp`, `sin`, `tanh`, `sqrt`, `integer_pow`, `convert_element_type`, ...) | kept |
    | `dot_general` (`@`, `jnp.einsum`, `jnp.tensordot`) of two named arrays | contracted and batch axes must have equal names (paired by name); free names must differ |
    | `reduce_sum`/`max`/`min`/`prod`/`and`/`or`, `argmax`, `argmin` | reduced names go |
    | `cumsum`/`prod`/`max`/`min`, `slice`, `dynamic_slice`, `rev`, `pad`, `dynamic_update_slice`, `copy` | kept |
    | `transpose` | permuted |
    | `squeeze` (`x[0]` is `slice` + `squeeze`) | squeezed names go |
    | `broadcast_in_dim` | kept; new axes are `Broadcast` axes, which line up with any name |
    | `reshape` | kept where an axis passes through; merged axes get the tuple of their names; a split is not handled |
    | `concatenate` | all operands must have the same names (else an error, or with `allow_materialise=True` the positional result) |
    | `lax.scan` carry, `cond`, `while` | kept |
    | `lax.scan` `xs` / `ys` | **kept**: a step sees the array without its first name; `ys` get a new `Positional` leading axis |
    | anything else (`gather` with array indices, a plain array `@` a named one, ...) | materialises if `allow_materialise=True`, else an error naming the primitive |

    A plain array meets a named one where that is unambiguous: a scalar always; an
    array of the full shape only when every named operand has the same axes (it is
    read in that order, and broadcast axes become `Positional`). Where it is
    ambiguous, or an unnamed (`Positional`) axis would have to move, a named array
    with `allow_materialise=True` gives JAX's positional result (a plain array);
    otherwise it raises `AxisNameError`.
    """

    array: Array
    axes: tuple[Hashable, ...] = eqx.field(static=True, converter=tuple)
    allow_materialise: bool = eqx.field(default=False, static=True)

    def __check_init__(self) -> None:
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(
                f"quax: `NamedArray` axes must be unique, got {self.axes}."
            )
        if jax.typeof(self.array).ndim != len(self.axes):
            raise ValueError(
                f"quax: `NamedArray` needs one name per axis: shape "
                f"{_shape(self.array)} but axes {self.axes}."
            )
        for axis, size in zip(self.axes, _shape(self.array), strict=True):
            want = getattr(axis, "size", None)
            if isinstance(want, int) and want != size:
                raise ValueError(
                    f"quax: axis {axis!r} must have size {want}, not {size}."
                )

    def aval(self) -> jax.core.ShapedArray:
        aval = jax.typeof(self.array)
        return jax.core.ShapedArray(aval.shape, aval.dtype, weak_type=aval.weak_type)

    def materialise(self) -> Array:
        if not self.allow_materialise:
            raise AxisNameError(
                "quax: refusing to drop the names of a `NamedArray` (axes "
                f"{self.axes}) implicitly.\nTo fix: pass `allow_materialise=True`, or "
                "take `.array` yourself."
            )
        return self.array

    def unstack(self, length: int) -> tuple[Any, Callable[[Any], Any]] | None:
        """As `lax.scan`'s `xs`: each step sees the array without its first name."""
        if not self.axes or _shape(self.array)[0] != length:
            return None
        axes, allow = self.axes[1:], self.allow_materialise
        return self.array, lambda piece: NamedArray(piece, axes, allow)

    def stack(self, length: int) -> tuple[Any, Callable[[Any], Any]] | None:
        """As `lax.scan`'s `ys`: the steps stacked along a new `Positional` axis."""
        del length
        new = _fresh(Positional, self.axes, 1)[0]
        axes, allow = (new, *self.axes), self.allow_materialise
        return self.array, lambda stacked: NamedArray(stacked, axes, allow)

    def _with(self, array: Any, axes: Sequence[Any]) -> "NamedArray":
        return NamedArray(array, tuple(axes), self.allow_materialise)

    # -- the user-level API --

    def enable_materialise(self, allow_materialise: bool = True) -> "NamedArray":
        """This array, allowed (or not) to become a plain array implicitly."""
        return NamedArray(self.array, self.axes, allow_materialise)

    def align(self, axes: Sequence[Hashable]) -> "NamedArray":
        """This array transposed so that its axes are `axes` (the same names)."""
        if sorted(map(repr, axes)) != sorted(map(repr, self.axes)):
            raise AxisNameError(
                f"quax: cannot align axes {self.axes} to {tuple(axes)}."
            )
        perm = tuple(self.axes.index(a) for a in axes)
        return self._with(self.array.transpose(perm), axes)

    def rename(self, mapping: dict[Hashable, Hashable]) -> "NamedArray":
        """This array with axes renamed by `mapping`."""
        return self._with(self.array, [mapping.get(a, a) for a in self.axes])

    # -- elementwise, aligned by name --

    add, radd = _nary(P.add_p)
    sub, rsub = _nary(P.sub_p)
    mul, rmul = _nary(P.mul_p)
    div, rdiv = _nary(P.div_p)
    rem, rrem = _nary(P.rem_p)
    pow, rpow = _nary(P.pow_p)
    max, rmax = _nary(P.max_p)
    min, rmin = _nary(P.min_p)
    atan2, ratan2 = _nary(P.atan2_p)
    nextafter, rnextafter = _nary(P.nextafter_p)
    and_, rand_ = _nary(P.and_p)
    or_, ror_ = _nary(P.or_p)
    xor, rxor = _nary(P.xor_p)
    eq, req = _nary(P.eq_p)
    ne, rne = _nary(P.ne_p)
    lt, rlt = _nary(P.lt_p)
    le, rle = _nary(P.le_p)
    gt, rgt = _nary(P.gt_p)
    ge, rge = _nary(P.ge_p)
    add_any, radd_any = _nary(P.add_jaxvals_p)

    # -- named arrays at any operand position --

    @handler("select_n", operands="all")
    @staticmethod
    def _where(*operands: Any, **params: Any) -> Any:
        """`jnp.where`, `lax.select_n`: the predicate and cases aligned by name."""
        return _elementwise(P.select_n_p, operands, params)

    @handler("clamp", operands="all")
    @staticmethod
    def _clamp(*operands: Any, **params: Any) -> Any:
        return _elementwise(P.clamp_p, operands, params)

    @handler("concatenate", operands="all")
    @staticmethod
    def _concatenate(*named: "NamedArray", **params: Any) -> Any:
        """`jnp.concatenate`: every operand named, with the same names."""
        if any(x.axes != named[0].axes for x in named):
            if named[0].allow_materialise:
                return NotImplemented  # the positional result, without names
            raise AxisNameError(
                "quax: `concatenate` of named arrays with different axes: "
                f"{', '.join(str(x.axes) for x in named)}."
            )
        out = P.concatenate_p.bind(*(x.array for x in named), **params)
        return named[0]._with(out, named[0].axes)

    # -- unary elementwise: the same axes --

    neg = _unary(P.neg_p)
    abs = _unary(P.abs_p)
    sign = _unary(P.sign_p)
    floor = _unary(P.floor_p)
    ceil = _unary(P.ceil_p)
    round = _unary(P.round_p)
    exp = _unary(P.exp_p)
    exp2 = _unary(P.exp2_p)
    log = _unary(P.log_p)
    log1p = _unary(P.log1p_p)
    expm1 = _unary(P.expm1_p)
    sqrt = _unary(P.sqrt_p)
    rsqrt = _unary(P.rsqrt_p)
    cbrt = _unary(P.cbrt_p)
    square = _unary(P.square_p)
    sin = _unary(P.sin_p)
    cos = _unary(P.cos_p)
    tan = _unary(P.tan_p)
    asin = _unary(P.asin_p)
    acos = _unary(P.acos_p)
    atan = _unary(P.atan_p)
    sinh = _unary(P.sinh_p)
    cosh = _unary(P.cosh_p)
    tanh = _unary(P.tanh_p)
    asinh = _unary(P.asinh_p)
    acosh = _unary(P.acosh_p)
    atanh = _unary(P.atanh_p)
    logistic = _unary(P.logistic_p)
    erf = _unary(P.erf_p)
    erfc = _unary(P.erfc_p)
    erf_inv = _unary(P.erf_inv_p)
    lgamma = _unary(P.lgamma_p)
    digamma = _unary(P.digamma_p)
    is_finite = _unary(P.is_finite_p)
    not_ = _unary(P.not_p)
    real = _unary(P.real_p)
    imag = _unary(P.imag_p)
    conj = _unary(P.conj_p)
    integer_pow = _unary(P.integer_pow_p)
    convert_element_type = _unary(P.convert_element_type_p)
    reduce_precision = _unary(P.reduce_precision_p)
    copy = _unary(P.copy_p)

    # -- indexing and cumulative ops: the same axes --

    slice = _along(P.slice_p)
    dynamic_slice = _along(P.dynamic_slice_p)
    rev = _along(P.rev_p)
    pad = _along(P.pad_p)
    cumsum = _along(P.cumsum_p)
    cumprod = _along(P.cumprod_p)
    cummax = _along(P.cummax_p)
    cummin = _along(P.cummin_p)
    cumlogsumexp = _along(P.cumlogsumexp_p)

    @handler("dynamic_update_slice")
    def _update_named(
        self, update: "NamedArray", *indices: ArrayLike, **params: Any
    ) -> Any:
        """An update with the same names."""
        if update.axes != self.axes:
            raise AxisNameError(
                f"quax: `dynamic_update_slice` of axes {self.axes} with an update "
                f"of axes {update.axes}."
            )
        return self._update_plain(update.array, *indices, **params)

    @handler("dynamic_update_slice")
    def _update_plain(self, update: ArrayLike, *indices: ArrayLike, **params: Any):
        """A plain update, read in this array's axis order."""
        out = P.dynamic_update_slice_p.bind(self.array, update, *indices, **params)
        return self._with(out, self.axes)

    # -- reductions: the reduced names go --

    reduce_sum = _reduction(P.reduce_sum_p)
    reduce_max = _reduction(P.reduce_max_p)
    reduce_min = _reduction(P.reduce_min_p)
    reduce_prod = _reduction(P.reduce_prod_p)
    reduce_and = _reduction(P.reduce_and_p)
    reduce_or = _reduction(P.reduce_or_p)
    argmax = _reduction(P.argmax_p)
    argmin = _reduction(P.argmin_p)

    # -- shapes --

    def transpose(self, /, *, permutation: Sequence[int]) -> "NamedArray":
        out = P.transpose_p.bind(self.array, permutation=tuple(permutation))
        return self._with(out, [self.axes[i] for i in permutation])

    def squeeze(self, /, *, dimensions: Sequence[int]) -> "NamedArray":
        out = P.squeeze_p.bind(self.array, dimensions=tuple(dimensions))
        return self._with(
            out, [a for i, a in enumerate(self.axes) if i not in dimensions]
        )

    def broadcast_in_dim(
        self, /, *, shape: Sequence[int], broadcast_dimensions: Sequence[int], **params
    ) -> "NamedArray":
        out = P.broadcast_in_dim_p.bind(
            self.array, shape=shape, broadcast_dimensions=broadcast_dimensions, **params
        )
        new = _fresh(Broadcast, self.axes, len(shape))
        axes: list[Any] = [None] * len(shape)
        for axis, size, d in zip(
            self.axes, _shape(self.array), broadcast_dimensions, strict=True
        ):
            # A size-1 axis stretched is constant along the result's axis.
            axes[d] = axis if size == shape[d] else None
        kept = [a for a in axes if a is not None]
        fresh = iter(a for a in new if a not in kept)
        return self._with(out, [a if a is not None else next(fresh) for a in axes])

    def reshape(self, /, *, new_sizes: Sequence[int], dimensions: Any, **params: Any):
        if dimensions is not None:
            return NotImplemented
        axes = _reshaped_axes(self.axes, _shape(self.array), tuple(new_sizes))
        if axes is None:
            return NotImplemented
        out = P.reshape_p.bind(
            self.array, new_sizes=tuple(new_sizes), dimensions=None, **params
        )
        return self._with(out, axes)

    # -- contractions: axes of the same name --

    def dot_general(
        self, other: "NamedArray", /, *, dimension_numbers: Any, **params: Any
    ) -> Any:
        (lc, rc), (lb, rb) = dimension_numbers
        rc = _pair(self, other, lc, rc, "contract")
        rb = _pair(self, other, lb, rb, "batch over")
        out = P.dot_general_p.bind(
            self.array, other.array, dimension_numbers=((lc, rc), (lb, rb)), **params
        )
        batch = [self.axes[i] for i in lb]
        lfree = [a for i, a in enumerate(self.axes) if i not in (*lc, *lb)]
        rfree = [a for i, a in enumerate(other.axes) if i not in (*rc, *rb)]
        clash = set(lfree) & set(rfree)
        if clash and self.allow_materialise:
            return NotImplemented  # the positional product, without names
        if clash:
            raise AxisNameError(
                f"quax: `dot_general` of axes {self.axes} and {other.axes}: "
                f"{sorted(map(repr, clash))} on both sides but neither contracted nor "
                "batched.\nTo fix: contract them, or rename one side."
            )
        return self._with(out, [*batch, *lfree, *rfree])


def _pair(
    lhs: NamedArray, rhs: NamedArray, ldims: Sequence[int], rdims: Sequence[int], what
) -> tuple[int, ...]:
    """`rdims` reordered so that `rhs`'s axes pair with `lhs`'s by name."""
    lnames = [lhs.axes[i] for i in ldims]
    rnames = [rhs.axes[i] for i in rdims]
    if set(lnames) != set(rnames):
        raise AxisNameError(
            f"quax: `dot_general` would {what} axes {tuple(lnames)} of {lhs.axes} with "
            f"axes {tuple(rnames)} of {rhs.axes}: the names differ.\n"
            "To fix: rename the axes so that contracted axes share a name."
        )
    out = tuple(rhs.axes.index(n) for n in lnames)
    for i, j in zip(ldims, out, strict=True):
        if _shape(lhs.array)[i] != _shape(rhs.array)[j]:
            raise AxisNameError(f"quax: axis {lhs.axes[i]!r} has two different sizes.")
    return out


def _reshaped_axes(
    axes: Sequence[Any], old: tuple[int, ...], new: tuple[int, ...]
) -> list[Any] | None:
    """The names after a reshape from `old` to `new`: an axis that passes through
    keeps its name, merged axes get the tuple of their names, a new size-1 axis is a
    `Broadcast` axis; None for a split (the pieces would have no names)."""
    if 0 in old or 0 in new:
        return None
    out: list[Any] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and j < len(new) and old[i] == new[j] == 1:
            out.append(axes[i])
            i, j = i + 1, j + 1
        elif j < len(new) and new[j] == 1:
            out.append(None)  # a new size-1 axis
            j += 1
        elif i < len(old) and old[i] == 1:
            i += 1  # a size-1 axis goes
        else:
            group, po, pn = [i], old[i], new[j]
            i, j = i + 1, j + 1
            while po != pn:
                if po < pn:
                    po *= old[i]
                    group.append(i)
                    i += 1
                else:
                    return None
            names = [axes[k] for k in group if old[k] != 1]
            out.append(names[0] if len(names) == 1 else tuple(names))
    taken = [a for a in out if a is not None]
    fresh = iter(_fresh(Broadcast, taken, len(out)))
    return [a if a is not None else next(fresh) for a in out]


def trace(
    array: NamedArray, *, offset: int = 0, axis1: Hashable, axis2: Hashable, dtype=None
) -> NamedArray:
    """`jnp.trace` over two named axes (the Quax library's `trace`)."""
    i, j = array.axes.index(axis1), array.axes.index(axis2)
    if i == j:
        raise ValueError("quax: cannot trace along the same named axis.")
    out = jax.numpy.trace(array.array, offset=offset, axis1=i, axis2=j, dtype=dtype)
    return array._with(out, [a for k, a in enumerate(array.axes) if k not in (i, j)])
