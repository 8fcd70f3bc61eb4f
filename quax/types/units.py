"""Quantities with units: `Unitful(array, unit)`, checked while tracing.

Units are static (part of the type, not of the data): a `Unit` is a product of powers
of base dimensions (`m`, `s`, `kg`, ...) times a scale, so `km` and `m` are compatible
and convert into each other. Primitives combine units (`mul`, `div`, powers, roots,
`dot_general`), require compatible ones (`add`, comparisons, `select_n`, ...), or keep
them (shape and indexing primitives, reductions). A dimensionless result is a plain
array, and a quantity never becomes a plain array silently.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from .._errors import QuaxError
from .._table import handler
from .._values import ArrayValue


P = jexc.primitives


class UnitError(QuaxError, ValueError):
    """Raised when units do not fit: `m + s`, `m + 1.0`, `m ** x` with a traced `x`,
    or a quantity would become a plain array (`exp(m)`). quax's own error (a
    `quax.QuaxError`), raised while tracing, at the user's line."""


# -- units ------------------------------------------------------------------------------


class Unit:
    """A unit: a scale times a product of powers of base dimensions.

    `Unit("m")` is a new base dimension; `Unit("km", m, 1000)` is a unit defined as
    `1000 * m`. Units multiply, divide and take (rational) powers; `3.0 * m` and
    `jnp.ones(3) / s` make quantities.
    """

    __slots__ = ("dims", "scale", "symbol")

    dims: tuple[tuple[str, Fraction], ...]
    scale: float
    symbol: str | None

    def __init__(self, symbol: str | None, of: "Unit | None" = None, scale: float = 1):
        """**Arguments:**

        - `symbol`: how the unit prints (`"km"`).
        - `of`: the unit this one is a multiple of; `None` makes a new base dimension
            called `symbol`.
        - `scale`: how many `of` one of this unit is.
        """
        if of is None:
            if not symbol:
                raise ValueError(
                    "quax: a base `Unit` needs a symbol, e.g. `Unit('m')`."
                )
            dims: tuple[tuple[str, Fraction], ...] = ((symbol, Fraction(1)),)
            total = float(scale)
        else:
            dims, total = of.dims, of.scale * float(scale)
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "scale", total)
        object.__setattr__(self, "symbol", symbol)

    @classmethod
    def _make(cls, dims: Mapping[str, Fraction], scale: float) -> "Unit":
        out = cls.__new__(cls)
        kept = tuple(sorted((k, Fraction(v)) for k, v in dims.items() if v != 0))
        object.__setattr__(out, "dims", kept)
        object.__setattr__(out, "scale", float(scale))
        object.__setattr__(out, "symbol", None)
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("quax: a `Unit` is immutable.")

    @property
    def dimensionless(self) -> bool:
        return not self.dims

    def compatible(self, other: "Unit") -> bool:
        """Whether the two units measure the same dimension (`km` and `m`: yes)."""
        return self.dims == other.dims

    def factor(self, to: "Unit") -> float:
        """How many `to` one of this unit is (`km.factor(m) == 1000`)."""
        if not self.compatible(to):
            raise UnitError(f"quax: cannot convert {self} to {to}: not compatible.")
        return self.scale / to.scale

    # -- algebra --

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, Unit):
            dims = dict(self.dims)
            for k, v in other.dims:
                dims[k] = dims.get(k, Fraction(0)) + v
            return Unit._make(dims, self.scale * other.scale)
        return NotImplemented

    def __truediv__(self, other: Any) -> Any:
        if isinstance(other, Unit):
            return self * other**-1
        return NotImplemented

    def __pow__(self, power: int | float | Fraction) -> "Unit":
        if not math.isfinite(power):
            # `x ** inf` has no unit unless `x` is a pure number: `(1 m) ** inf` is
            # not any power of metres.
            if self.dimensionless and self.scale == 1:
                return self
            raise UnitError(
                f"quax: `({self}) ** {power}` has no unit: a non-finite power of a "
                "quantity is not a quantity.\nTo fix: make the base a plain number "
                "first (divide it by its unit), or use a finite exponent."
            )
        p = Fraction(power).limit_denominator(1000)
        if p == 1:
            return self
        return Unit._make({k: v * p for k, v in self.dims}, self.scale ** float(p))

    # `3.0 * m`, `x / s`: quantities.
    def __rmul__(self, array: Any) -> Any:
        if isinstance(array, Unitful):
            return Unitful(array.array, array.unit * self)
        return Unitful(array, self)

    def __rtruediv__(self, array: Any) -> Any:
        if isinstance(array, Unitful):
            return Unitful(array.array, array.unit / self)
        return Unitful(array, self**-1)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Unit)
            and self.dims == other.dims
            and math.isclose(self.scale, other.scale, rel_tol=1e-12)
        )

    def __hash__(self) -> int:
        return hash(self.dims)

    def __lt__(self, other: "Unit") -> bool:
        # An arbitrary total order, so that dicts keyed by units flatten as pytrees.
        return (self.dims, self.scale) < (other.dims, other.scale)

    def __repr__(self) -> str:
        if self.symbol:
            return self.symbol
        if not self.dims:
            return "dimensionless" if self.scale == 1 else f"{self.scale:g}"
        parts = [k if v == 1 else f"{k}^{v}" for k, v in self.dims]
        prefix = "" if self.scale == 1 else f"{self.scale:g} "
        return prefix + " ".join(parts)


dimensionless = Unit._make({}, 1.0)
m = Unit("m")
s = Unit("s")
kg = Unit("kg")
A = Unit("A")
K = Unit("K")
mol = Unit("mol")
km = Unit("km", m, 1000)
cm = Unit("cm", m, 0.01)
mm = Unit("mm", m, 0.001)
g = Unit("g", kg, 0.001)
ms = Unit("ms", s, 0.001)
minute = Unit("min", s, 60)
hour = Unit("h", s, 3600)
Hz = Unit("Hz", s**-1)
N = Unit("N", kg * m / s**2)
J = Unit("J", N * m)
W = Unit("W", J / s)


def _as_unit(x: Any) -> Unit:
    """A `Unit` from a `Unit`, or from a `{Unit: exponent}` dict (the Quax library's
    `units` argument)."""
    if isinstance(x, Unit):
        return x
    if isinstance(x, Mapping):
        out = dimensionless
        for unit, power in x.items():
            out = out * _as_unit(unit) ** power
        return out
    raise TypeError(
        f"quax: `Unitful` expects a `Unit` (e.g. `quax.units.m`) or a "
        f"{{unit: exponent}} dict, got {x!r}."
    )


# -- quantities ---------------------------------------------------------------------------


_MSG_MATERIALISE = (
    "quax: a quantity in {unit} is not turned into a plain array implicitly (its unit "
    "would be lost).\nTo fix: make it dimensionless first (divide by a unit), or take "
    "its number explicitly with `q.to_value(unit)`."
)


def _cast(x: Any, like: Any) -> Any:
    """`x` with the dtype of `like` (a converted quantity keeps its dtype)."""
    return jax.lax.convert_element_type(x, jax.typeof(like).dtype)


def _wrap(array: Any, unit: Unit) -> Any:
    """A quantity, or a plain array (scaled to 1) if `unit` is dimensionless."""
    if not unit.dimensionless:
        return Unitful(array, unit)
    if unit.scale == 1:
        return array
    return _cast(array * unit.scale, array)


def _concrete(x: Any) -> np.ndarray | None:
    """The value of a plain operand known while tracing (literals are), else None."""
    if isinstance(x, Unitful):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _in_unit(x: Any, unit: Unit, what: str) -> Any:
    """The numbers of operand `x` in `unit`: a compatible quantity is converted, a
    concrete plain 0, inf or nan is accepted (the same in any unit), anything else is an error."""
    if isinstance(x, Unitful):
        if not x.unit.compatible(unit):
            raise UnitError(
                f"quax: `{what}` needs compatible units, got {unit} and {x.unit}.\n"
                f"To fix: convert one operand (`q.to(unit)`) or fix the formula."
            )
        factor = x.unit.factor(unit)
        return x.array if factor == 1 else _cast(x.array * factor, x.array)
    value = _concrete(x)
    if value is not None and np.all((value == 0) | ~np.isfinite(value)):
        return x  # 0, inf and nan are the same in every unit
    raise UnitError(
        f"quax: `{what}` of a quantity in {unit} and a plain (dimensionless) array.\n"
        f"To fix: give the plain operand a unit (`x * {unit}`), or make the quantity "
        "dimensionless first."
    )


def _first_unit(operands: Sequence[Any]) -> Unit:
    return next(x.unit for x in operands if isinstance(x, Unitful))


def _compatible(prim: jexc.Primitive, *, plain: bool = False) -> tuple[Any, Any]:
    """Handlers `(forward, reflected)` for a binary primitive whose operands must have
    compatible units; the result has the left operand's unit (`plain`: no unit)."""

    def forward(self: "Unitful", other: Any, /, **params: Any) -> Any:
        out = prim.bind(self.array, _in_unit(other, self.unit, prim.name), **params)
        return out if plain else Unitful(out, self.unit)

    def reflected(self: "Unitful", other: Any, /, **params: Any) -> Any:
        out = prim.bind(_in_unit(other, self.unit, prim.name), self.array, **params)
        return out if plain else Unitful(out, self.unit)

    forward.__doc__ = f"`{prim.name}`: compatible units."
    reflected.__doc__ = forward.__doc__
    return forward, reflected


def _keeps(prim: jexc.Primitive) -> Callable[..., Any]:
    """The handler for a primitive whose result has its operand 0's unit (the other
    operands, if any, are plain: indices, sizes)."""

    def handler(self: "Unitful", *operands: ArrayLike, **params: Any) -> Any:
        return Unitful(prim.bind(self.array, *operands, **params), self.unit)

    handler.__doc__ = f"`{prim.name}`: the same unit."
    return handler


def _drops(prim: jexc.Primitive) -> Callable[..., Any]:
    """The handler for a primitive whose result has no unit (signs, indices)."""

    def handler(self: "Unitful", /, **params: Any) -> Any:
        return prim.bind(self.array, **params)

    handler.__doc__ = f"`{prim.name}`: a plain array."
    return handler


class Unitful(ArrayValue):
    """An array with a unit. Build one as `Unitful(array, unit)` or `array * unit`.

    | primitive | result |
    |---|---|
    | `mul`, `div`, `dot_general` (either side) | units multiply / divide |
    | `integer_pow`, `pow` (concrete exponent), `sqrt`, `rsqrt`, `cbrt`, `square` | unit to that power |
    | `reduce_prod` | unit to the number of elements reduced |
    | `add`, `sub`, `max`, `min`, `rem`, `nextafter`, `atan2` | compatible units (the right operand is converted to the left's); `atan2` is dimensionless |
    | `eq`, `ne`, `lt`, `le`, `gt`, `ge` | compatible units; a plain boolean array |
    | `select_n` (`jnp.where`), `concatenate`, `clamp`, `dynamic_update_slice`, `pad` (any operand position) | compatible units |
    | `neg`, `abs`, `floor`, `ceil`, `round`, `real`, `imag`, `conj`, `copy`, `reduce_sum`/`max`/`min`, `cumsum`/`max`/`min`, `transpose`, `reshape`, `broadcast_in_dim`, `squeeze`, `rev`, `slice`, `dynamic_slice`, `gather`, `convert_element_type` (but to `bool`), `reduce_precision` | same unit |
    | `sign`, `argmax`, `argmin`, `is_finite`, `convert_element_type` to `bool` (is nonzero) | plain array |
    | `lu`, `triangular_solve` (either side), `cholesky`, `eigh`, `custom_linear_solve` (`jnp.linalg.solve`, `inv`) | units of the factors / solution |
    | `lax.scan` `xs`/`ys`/carry, `cond`, `while` | kept (sliced and stacked leaf by leaf) |
    | anything else (`exp`, `sin`, `log`, ...) | error naming the primitive: a quantity never materialises |

    A plain operand is dimensionless: `q + 1.0` is an error, but a concrete `0`, `inf`
    or `nan` is accepted wherever a compatible quantity is (`jnp.maximum(q, 0)`,
    `q > 0`, `jnp.where(c, q, jnp.nan)`): they are the same in every unit. A
    dimensionless result is a plain array (`km / m` gives numbers times 1000).
    """

    array: Array = eqx.field(converter=jnp.asarray)
    unit: Unit = eqx.field(static=True, converter=_as_unit)

    def aval(self) -> jax.core.ShapedArray:
        aval = jax.typeof(self.array)
        return jax.core.ShapedArray(aval.shape, aval.dtype, weak_type=aval.weak_type)

    def materialise(self) -> Any:
        raise UnitError(_MSG_MATERIALISE.format(unit=self.unit))

    def scan_leafwise(self) -> bool:
        return True  # one leaf, the array: slicing it slices the quantity

    # -- the user-level API --

    @property
    def units(self) -> dict[Unit, int | Fraction]:
        """`{base dimension: exponent}`, as the Quax library's `Unitful.units`."""
        return {
            Unit(k): (int(v) if v.denominator == 1 else v) for k, v in self.unit.dims
        }

    def to(self, unit: Unit) -> "Unitful":
        """The same quantity expressed in `unit` (compatible with this one's)."""
        return Unitful(_cast(self.array * self.unit.factor(unit), self.array), unit)

    def to_value(self, unit: Unit) -> Array:
        """This quantity's numbers in `unit`: `(3 * km).to_value(m) == 3000`."""
        return self.to(unit).array

    # -- units combine: one handler per (operand kinds) --

    @handler("mul")
    def _mul(self, other: "Unitful", /, **params: Any) -> Any:
        out = P.mul_p.bind(self.array, other.array, **params)
        return _wrap(out, self.unit * other.unit)

    @handler("mul")
    def _mul_plain(self, other: ArrayLike, /, **params: Any) -> Any:
        return _wrap(P.mul_p.bind(self.array, other, **params), self.unit)

    @handler("rmul")
    def _rmul_plain(self, other: ArrayLike, /, **params: Any) -> Any:
        return _wrap(P.mul_p.bind(other, self.array, **params), self.unit)

    @handler("div")
    def _div(self, other: "Unitful", /, **params: Any) -> Any:
        out = P.div_p.bind(self.array, other.array, **params)
        return _wrap(out, self.unit / other.unit)

    @handler("div")
    def _div_plain(self, other: ArrayLike, /, **params: Any) -> Any:
        return _wrap(P.div_p.bind(self.array, other, **params), self.unit)

    @handler("rdiv")
    def _rdiv_plain(self, other: ArrayLike, /, **params: Any) -> Any:
        return _wrap(P.div_p.bind(other, self.array, **params), self.unit**-1)

    @handler("dot_general")
    def _dot(self, other: "Unitful", /, **params: Any) -> Any:
        out = P.dot_general_p.bind(self.array, other.array, **params)
        return _wrap(out, self.unit * other.unit)

    @handler("dot_general")
    def _dot_plain(self, other: ArrayLike, /, **params: Any) -> Any:
        return _wrap(P.dot_general_p.bind(self.array, other, **params), self.unit)

    @handler("rdot_general")
    def _rdot_plain(self, other: ArrayLike, /, **params: Any) -> Any:
        return _wrap(P.dot_general_p.bind(other, self.array, **params), self.unit)

    # -- powers and roots: the unit to that power --

    def integer_pow(self, /, *, y: int) -> Any:
        return _wrap(P.integer_pow_p.bind(self.array, y=y), self.unit**y)

    def pow(self, other: ArrayLike, /, **params: Any) -> Any:
        power = _concrete(other)
        if power is None or power.ndim != 0:
            raise UnitError(
                f"quax: `{self.unit} ** x` needs a concrete scalar `x` (the unit of "
                "the result depends on it), got a traced or non-scalar exponent.\n"
                "To fix: use a Python number as the exponent, or make the base "
                "dimensionless first."
            )
        return _wrap(
            P.pow_p.bind(self.array, other, **params), self.unit ** float(power)
        )

    def sqrt(self, /, **params: Any) -> Any:
        return _wrap(P.sqrt_p.bind(self.array, **params), self.unit ** Fraction(1, 2))

    def rsqrt(self, /, **params: Any) -> Any:
        return _wrap(P.rsqrt_p.bind(self.array, **params), self.unit ** Fraction(-1, 2))

    def cbrt(self, /, **params: Any) -> Any:
        return _wrap(P.cbrt_p.bind(self.array, **params), self.unit ** Fraction(1, 3))

    def square(self, /, **params: Any) -> Any:
        return _wrap(P.square_p.bind(self.array, **params), self.unit**2)

    def reduce_prod(self, /, *, axes: tuple[int, ...], **params: Any) -> Any:
        shape = jax.typeof(self.array).shape
        count = math.prod(shape[i] for i in axes)
        out = P.reduce_prod_p.bind(self.array, axes=axes, **params)
        return _wrap(out, self.unit**count)

    # -- units must agree (the other operand is converted to this one's unit) --

    add, radd = _compatible(P.add_p)
    sub, rsub = _compatible(P.sub_p)
    max, rmax = _compatible(P.max_p)
    min, rmin = _compatible(P.min_p)
    rem, rrem = _compatible(P.rem_p)
    nextafter, rnextafter = _compatible(P.nextafter_p)
    atan2, ratan2 = _compatible(P.atan2_p, plain=True)
    eq, req = _compatible(P.eq_p, plain=True)
    ne, rne = _compatible(P.ne_p, plain=True)
    lt, rlt = _compatible(P.lt_p, plain=True)
    le, rle = _compatible(P.le_p, plain=True)
    gt, rgt = _compatible(P.gt_p, plain=True)
    ge, rge = _compatible(P.ge_p, plain=True)

    # -- quantities at any operand position: all converted to the first's unit --

    @handler("select_n", operands="all")
    @staticmethod
    def _where(which: ArrayLike, *cases: Any, **params: Any) -> Any:
        # A plain predicate (a quantity as the predicate is declined by annotation).
        unit = _first_unit(cases)
        arrays = [_in_unit(x, unit, "select_n") for x in cases]
        return Unitful(P.select_n_p.bind(which, *arrays, **params), unit)

    @handler("concatenate", operands="all")
    @staticmethod
    def _concatenate(*operands: Any, **params: Any) -> Any:
        unit = _first_unit(operands)
        arrays = [_in_unit(x, unit, "concatenate") for x in operands]
        return Unitful(P.concatenate_p.bind(*arrays, **params), unit)

    @handler("clamp", operands="all")
    @staticmethod
    def _clamp(lo: Any, x: Any, hi: Any, **params: Any) -> Any:
        unit = _first_unit((x, lo, hi))
        lo, x, hi = (_in_unit(y, unit, "clamp") for y in (lo, x, hi))
        return Unitful(P.clamp_p.bind(lo, x, hi, **params), unit)

    @handler("dynamic_update_slice", operands="all")
    @staticmethod
    def _update(operand: Any, update: Any, *indices: ArrayLike, **params: Any) -> Any:
        unit = _first_unit((operand, update))
        operand, update = (_in_unit(y, unit, "update") for y in (operand, update))
        out = P.dynamic_update_slice_p.bind(operand, update, *indices, **params)
        return Unitful(out, unit)

    @handler("pad", operands="all")
    @staticmethod
    def _pad(operand: Any, padding_value: Any, **params: Any) -> Any:
        unit = _first_unit((operand, padding_value))
        operand, value = (_in_unit(y, unit, "pad") for y in (operand, padding_value))
        return Unitful(P.pad_p.bind(operand, value, **params), unit)

    # -- the same unit --

    neg = _keeps(P.neg_p)
    abs = _keeps(P.abs_p)
    floor = _keeps(P.floor_p)
    ceil = _keeps(P.ceil_p)
    round = _keeps(P.round_p)
    real = _keeps(P.real_p)
    imag = _keeps(P.imag_p)
    conj = _keeps(P.conj_p)
    copy = _keeps(P.copy_p)
    reduce_sum = _keeps(P.reduce_sum_p)
    reduce_max = _keeps(P.reduce_max_p)
    reduce_min = _keeps(P.reduce_min_p)
    cumsum = _keeps(P.cumsum_p)
    cummax = _keeps(P.cummax_p)
    cummin = _keeps(P.cummin_p)
    transpose = _keeps(P.transpose_p)
    reshape = _keeps(P.reshape_p)
    broadcast_in_dim = _keeps(P.broadcast_in_dim_p)
    squeeze = _keeps(P.squeeze_p)
    rev = _keeps(P.rev_p)
    slice = _keeps(P.slice_p)
    dynamic_slice = _keeps(P.dynamic_slice_p)
    gather = _keeps(P.gather_p)

    def convert_element_type(self, /, *, new_dtype: Any, **params: Any) -> Any:
        """The same unit; to `bool` (whether each entry is nonzero, the same in every
        unit: `jnp.any(q)`, `jnp.all(q)`) a plain array."""
        out = P.convert_element_type_p.bind(self.array, new_dtype=new_dtype, **params)
        return out if new_dtype == jnp.bool_ else Unitful(out, self.unit)

    reduce_precision = _keeps(P.reduce_precision_p)

    # -- plain results --

    sign = _drops(P.sign_p)
    argmax = _drops(P.argmax_p)
    argmin = _drops(P.argmin_p)
    is_finite = _drops(P.is_finite_p)

    # -- linear algebra --

    def lu(self, /, **params: Any) -> list[Any]:
        # The packed factor carries U's unit; its strictly lower part (L, unitless)
        # is only read by unit-diagonal triangular solves, which treat it so.
        lu, pivots, perm = P.lu_p.bind(self.array, **params)
        return [Unitful(lu, self.unit), pivots, perm]

    @handler("triangular_solve")
    def _solve(self, b: "Unitful", /, *, unit_diagonal: bool, **params: Any) -> Any:
        out = P.triangular_solve_p.bind(
            self.array, b.array, unit_diagonal=unit_diagonal, **params
        )
        return _wrap(out, b.unit / self._solve_unit(unit_diagonal))

    @handler("triangular_solve")
    def _solve_plain(
        self, b: ArrayLike, /, *, unit_diagonal: bool, **params: Any
    ) -> Any:
        out = P.triangular_solve_p.bind(
            self.array, b, unit_diagonal=unit_diagonal, **params
        )
        return _wrap(out, self._solve_unit(unit_diagonal) ** -1)

    def _solve_unit(self, unit_diagonal: bool) -> Unit:
        # An implicit unit diagonal is only consistent with a dimensionless matrix.
        return dimensionless if unit_diagonal else self.unit

    def rtriangular_solve(
        self, a: ArrayLike, /, *, unit_diagonal: bool, **params: Any
    ) -> Any:
        out = P.triangular_solve_p.bind(
            a, self.array, unit_diagonal=unit_diagonal, **params
        )
        return _wrap(out, self.unit)

    def cholesky(self, /, **params: Any) -> Any:
        out = P.cholesky_p.bind(self.array, **params)
        return _wrap(out, self.unit ** Fraction(1, 2))

    def eigh(self, /, **params: Any) -> list[Any]:
        vectors, values = P.eigh_p.bind(self.array, **params)
        return [vectors, _wrap(values, self.unit)]

    def custom_linear_solve(self, *operands: Any, const_lengths: Any, **params: Any):
        """`jnp.linalg.solve(a, b)`, `inv(a)`: solve `matvec(x) = b` where this
        quantity is the (first) constant of `matvec`; `x` has unit `b / a`."""
        n_consts = sum(const_lengths)
        if const_lengths.matvec != 1 or len(operands) != n_consts:
            return NotImplemented  # several matvec constants, or a pytree `b`
        b = operands[-1]
        stripped = [x.array if isinstance(x, Unitful) else x for x in operands]
        out = P.linear_solve_p.bind(
            self.array, *stripped, const_lengths=const_lengths, **params
        )
        unit = b.unit if isinstance(b, Unitful) else dimensionless
        return [_wrap(x, unit / self.unit) for x in out]
