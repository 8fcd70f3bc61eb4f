"""Structured matrices: tridiagonal, diagonal, scaled identity and Kronecker products.

Each stores O(n) (Kronecker: its factors) numbers and multiplies a dense operand in
O(n) per column; transposes, scalar products, sums and products among them keep the
structure. Everything else materialises the dense matrix.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Shaped

from .._quaxify import quaxify
from .._table import handler
from .._values import ArrayValue, Value


Scalar = Shaped[ArrayLike, ""]
Dense2D = Shaped[ArrayLike, "rows cols"]


class _Matrix(ArrayValue):
    """Shared by the structured matrices: `dot_general` with a dense operand on either
    side, given how the matrix (or its transpose) applies to a dense array whose axis
    0 it contracts (`_apply`). Any contraction of one matrix axis with one axis of the
    other operand is accepted; dot batch dims decline (and so materialise). Each
    subclass adds its structure-keeping products with other structured matrices."""

    def _apply(self, z: Array, transpose: bool) -> Array:
        """`self @ z` (or `self.T @ z`) for a dense `z` of shape `(k, *rest)`."""
        raise NotImplementedError

    @handler("dot_general")
    def _dot_dense(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`M @ x` (or `M.T @ x`): the matrix applied to a dense `x`."""
        how = _contraction(self, other, dimension_numbers, params, reflected=False)
        if how is None:
            return NotImplemented
        transpose, axis, dtype = how
        z = jnp.moveaxis(jnp.asarray(other), axis, 0).astype(dtype)
        return self._apply(z, transpose)

    @handler("rdot_general")
    def _rdot_dense(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`x @ M` (or `x @ M.T`) for a dense `x`: `(M.T @ x.T).T`."""
        how = _contraction(self, other, dimension_numbers, params, reflected=True)
        if how is None:
            return NotImplemented
        transpose, axis, dtype = how
        z = jnp.moveaxis(jnp.asarray(other), axis, 0).astype(dtype)
        return jnp.moveaxis(self._apply(z, transpose), 0, -1)


class TridiagonalMatrix(_Matrix):
    """A square matrix that is zero off its three central diagonals.

    | primitive | result |
    |---|---|
    | `dot_general` with a dense operand, either side | dense, O(n) per column |
    | `dot_general` with a `Diagonal`/`Identity`, either side | `TridiagonalMatrix` |
    | `jit` of `jnp.linalg.solve(T, b)` | dense, via `lax.linalg.tridiagonal_solve` |
    | `transpose` | `TridiagonalMatrix` |
    | `mul` by a scalar or a dense matrix, `div` by a scalar, `neg` | `TridiagonalMatrix` |
    | `add`/`sub` with a `TridiagonalMatrix`, `Diagonal` or `Identity` | `TridiagonalMatrix` |
    | `convert_element_type` | `TridiagonalMatrix` |
    | anything else | materialised |
    """

    diagonal: Shaped[Array, " n"]
    lower_diagonal: Shaped[Array, " n-1"]
    upper_diagonal: Shaped[Array, " n-1"]

    def __init__(
        self,
        diagonal: Shaped[ArrayLike, " n"],
        lower_diagonal: Shaped[ArrayLike, " n-1"],
        upper_diagonal: Shaped[ArrayLike, " n-1"],
    ):
        """**Arguments:**

        - `diagonal`: the main diagonal, shape `(n,)`.
        - `lower_diagonal`: the diagonal below it (`T[i + 1, i]`), shape `(n - 1,)`.
        - `upper_diagonal`: the diagonal above it (`T[i, i + 1]`), shape `(n - 1,)`.
        """
        dtype = jnp.result_type(diagonal, lower_diagonal, upper_diagonal)
        self.diagonal = jnp.asarray(diagonal, dtype)
        self.lower_diagonal = jnp.asarray(lower_diagonal, dtype)
        self.upper_diagonal = jnp.asarray(upper_diagonal, dtype)

    def __check_init__(self):
        if self.diagonal.ndim != 1 or self.diagonal.shape[0] < 1:
            raise ValueError(
                "`TridiagonalMatrix` expects `diagonal` of shape (n,) with n >= 1, "
                f"got {tuple(self.diagonal.shape)}."
            )
        (n,) = self.diagonal.shape
        for name in ("lower_diagonal", "upper_diagonal"):
            shape = tuple(getattr(self, name).shape)
            if shape != (n - 1,):
                raise ValueError(
                    f"`TridiagonalMatrix` with a diagonal of length {n} expects "
                    f"`{name}` of shape ({n - 1},), got {shape}."
                )

    def aval(self) -> jax.core.ShapedArray:
        (n,) = self.diagonal.shape
        return jax.core.ShapedArray((n, n), self.diagonal.dtype)

    def materialise(self) -> Array:
        return (
            jnp.diag(self.diagonal)
            + jnp.diag(self.lower_diagonal, -1)
            + jnp.diag(self.upper_diagonal, 1)
        )

    def _apply(self, z: Array, transpose: bool) -> Array:
        d, lo, up = _cast_all(
            (self.diagonal, self.lower_diagonal, self.upper_diagonal), z.dtype
        )
        if transpose:
            lo, up = up, lo
        below = [(0, 1)] + [(0, 0)] * (z.ndim - 1)
        above = [(1, 0)] + [(0, 0)] * (z.ndim - 1)
        out = _col(d, z) * z
        out = out + jnp.pad(_col(up, z) * z[1:], below)
        return out + jnp.pad(_col(lo, z) * z[:-1], above)

    def _bands(self) -> tuple[Array, Array, Array]:
        return self.diagonal, self.lower_diagonal, self.upper_diagonal

    # -- products --

    @handler("dot_general")
    def _dot_diagonal(
        self, other: "Diagonal | Identity", /, *, dimension_numbers, **params
    ):
        """`T @ D` scales column j by `d[j]`."""
        how = _product(self, other, dimension_numbers, params, reflected=False)
        if how is None:
            return NotImplemented
        transpose, dtype = how
        t, d = self._oriented(transpose), other._diagonal()
        out = TridiagonalMatrix(
            t.diagonal * d, t.lower_diagonal * d[:-1], t.upper_diagonal * d[1:]
        )
        return _cast(out, dtype)

    @handler("rdot_general")
    def _rdot_diagonal(
        self, other: "Diagonal | Identity", /, *, dimension_numbers, **params
    ):
        """`D @ T` scales row i by `d[i]`."""
        how = _product(self, other, dimension_numbers, params, reflected=True)
        if how is None:
            return NotImplemented
        transpose, dtype = how
        t, d = self._oriented(transpose), other._diagonal()
        out = TridiagonalMatrix(
            d * t.diagonal, d[1:] * t.lower_diagonal, d[:-1] * t.upper_diagonal
        )
        return _cast(out, dtype)

    def jit(self, *others: ArrayLike, jaxpr, name, **params):
        """`jnp.linalg.solve(T, b)` (a `jit` named `solve` whose body is an LU solve)
        with a dense `b` runs `lax.linalg.tridiagonal_solve` instead; any other `jit`
        declines, to be walked by quax as usual."""
        if name != "solve" or len(others) != 1 or not _is_lu_solve(jaxpr):
            return NotImplemented
        (b,) = others
        if jnp.ndim(b) not in (1, 2):
            return NotImplemented
        return [solve(self, b)]

    def transpose(self, *, permutation=(1, 0), **params):
        return self._oriented(tuple(permutation) != (0, 1))

    # -- elementwise --

    @handler("mul", "rmul")
    def _scale(self, other: Scalar, /, **params):
        return self._map(lambda x: x * other)

    @handler("mul", "rmul")
    def _mul_dense(self, other: Dense2D, /, **params):
        """Only the three diagonals of the (broadcast) dense matrix are read."""
        n = self.diagonal.shape[0]
        other = jnp.broadcast_to(other, (n, n))
        return TridiagonalMatrix(
            self.diagonal * jnp.diagonal(other),
            self.lower_diagonal * jnp.diagonal(other, -1),
            self.upper_diagonal * jnp.diagonal(other, 1),
        )

    @handler("div")
    def _div_scalar(self, other: Scalar, /, **params):
        return self._map(lambda x: _div(x, other))

    def neg(self, **params):
        return self._map(lambda x: -x)

    def convert_element_type(self, *, new_dtype, sharding=None, **params):
        if sharding is not None:
            return NotImplemented
        return self._map(lambda x: lax.convert_element_type(x, new_dtype))

    @handler("add", "radd", "add_any", "radd_any")
    def _add(self, other: "TridiagonalMatrix | Diagonal | Identity", /, **params):
        """Band by band."""
        return self._combine(other, lambda a, b: a + b)

    @handler("sub")
    def _sub(self, other: "TridiagonalMatrix | Diagonal | Identity", /, **params):
        return self._combine(other, lambda a, b: a - b)

    @handler("rsub")
    def _rsub(self, other: "TridiagonalMatrix | Diagonal | Identity", /, **params):
        return self._combine(other, lambda a, b: b - a)

    # -- private --

    def _oriented(self, transpose: bool) -> "TridiagonalMatrix":
        if not transpose:
            return self
        return TridiagonalMatrix(
            self.diagonal, self.upper_diagonal, self.lower_diagonal
        )

    def _combine(self, other: Any, fn: Callable[[Array, Array], Array]) -> Any:
        pairs = zip(self._bands(), other._bands(), strict=True)
        return TridiagonalMatrix(*(fn(a, b) for a, b in pairs))

    def _map(self, fn: Callable[[Array], Array]) -> "TridiagonalMatrix":
        return TridiagonalMatrix(*(fn(x) for x in self._bands()))


class Diagonal(_Matrix):
    """A square matrix that is zero off its diagonal.

    | primitive | result |
    |---|---|
    | `dot_general` with a dense operand, either side | dense, O(n) per column |
    | `dot_general` with a `Diagonal`/`Identity` | `Diagonal` |
    | `transpose` | itself |
    | `mul` by a scalar or a dense matrix, `div` by a scalar, `neg` | `Diagonal` |
    | `add`/`sub` with a `Diagonal` or `Identity` | `Diagonal` |
    | `convert_element_type` | `Diagonal` |
    | anything else | materialised |
    """

    diagonal: Shaped[Array, " n"]

    def __init__(self, diagonal: Shaped[ArrayLike, " n"]):
        """**Arguments:**

        - `diagonal`: the diagonal, shape `(n,)`.
        """
        self.diagonal = jnp.asarray(diagonal)

    def __check_init__(self):
        if self.diagonal.ndim != 1:
            raise ValueError(
                "`Diagonal` expects `diagonal` of shape (n,), got "
                f"{tuple(self.diagonal.shape)}."
            )

    def aval(self) -> jax.core.ShapedArray:
        (n,) = self.diagonal.shape
        return jax.core.ShapedArray((n, n), self.diagonal.dtype)

    def materialise(self) -> Array:
        return jnp.diag(self.diagonal)

    def _apply(self, z: Array, transpose: bool) -> Array:
        return _col(self.diagonal.astype(z.dtype), z) * z

    def _diagonal(self) -> Array:
        return self.diagonal

    def _bands(self) -> tuple[Array, Array, Array]:
        off = jnp.zeros(self.diagonal.shape[0] - 1, self.diagonal.dtype)
        return self.diagonal, off, off

    # -- products --

    @handler("dot_general")
    def _dot_diagonal(
        self, other: "Diagonal | Identity", /, *, dimension_numbers, **params
    ):
        how = _product(self, other, dimension_numbers, params, reflected=False)
        if how is None:
            return NotImplemented
        return _cast(Diagonal(self.diagonal * other._diagonal()), how[1])

    @handler("rdot_general")
    def _rdot_diagonal(
        self, other: "Diagonal | Identity", /, *, dimension_numbers, **params
    ):
        how = _product(self, other, dimension_numbers, params, reflected=True)
        if how is None:
            return NotImplemented
        return _cast(Diagonal(other._diagonal() * self.diagonal), how[1])

    def transpose(self, *, permutation=(1, 0), **params):
        return self

    # -- elementwise --

    @handler("mul", "rmul")
    def _scale(self, other: Scalar, /, **params):
        return Diagonal(self.diagonal * other)

    @handler("mul", "rmul")
    def _mul_dense(self, other: Dense2D, /, **params):
        """Only the diagonal of the (broadcast) dense matrix is read."""
        (n,) = self.diagonal.shape
        return Diagonal(self.diagonal * jnp.diagonal(jnp.broadcast_to(other, (n, n))))

    @handler("div")
    def _div_scalar(self, other: Scalar, /, **params):
        return Diagonal(_div(self.diagonal, other))

    def neg(self, **params):
        return Diagonal(-self.diagonal)

    def convert_element_type(self, *, new_dtype, sharding=None, **params):
        if sharding is not None:
            return NotImplemented
        return Diagonal(lax.convert_element_type(self.diagonal, new_dtype))

    @handler("add", "radd", "add_any", "radd_any")
    def _add(self, other: "Diagonal | Identity", /, **params):
        return Diagonal(self.diagonal + other._diagonal())

    @handler("sub")
    def _sub(self, other: "Diagonal | Identity", /, **params):
        return Diagonal(self.diagonal - other._diagonal())

    @handler("rsub")
    def _rsub(self, other: "Diagonal | Identity", /, **params):
        return Diagonal(other._diagonal() - self.diagonal)


class Identity(_Matrix):
    """`scale` times the `size` x `size` identity matrix.

    | primitive | result |
    |---|---|
    | `dot_general` with a dense operand, either side | dense: `scale * other` |
    | `dot_general` with any value, either side | `scale * other`, dispatched again (keeps its structure if its `mul` does) |
    | `transpose` | itself |
    | `mul` by a scalar, `div` by a scalar, `neg` | `Identity` |
    | `mul` by a dense matrix | `Diagonal` |
    | `add`/`sub` with an `Identity` | `Identity` (with a `Diagonal` or `TridiagonalMatrix`: theirs) |
    | `convert_element_type` | `Identity` |
    | anything else | materialised |
    """

    scale: Shaped[Array, ""]
    dim: int = eqx.field(static=True)

    def __init__(self, size: int, scale: ArrayLike = 1.0, dtype: Any = None):
        """**Arguments:**

        - `size`: the number of rows (and columns).
        - `scale`: the value on the diagonal (a scalar; default 1).
        - `dtype`: the dtype (default: that of `scale`).
        """
        self.dim = int(size)
        self.scale = jnp.asarray(scale, dtype)

    def __check_init__(self):
        if self.scale.ndim != 0 or self.dim < 0:
            raise ValueError(
                "`Identity` expects a scalar `scale` and a non-negative `size`, got "
                f"scale of shape {tuple(self.scale.shape)} and size {self.dim}."
            )

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray((self.dim, self.dim), self.scale.dtype)

    def materialise(self) -> Array:
        return self.scale * jnp.eye(self.dim, dtype=self.scale.dtype)

    def _apply(self, z: Array, transpose: bool) -> Array:
        return self.scale.astype(z.dtype) * z

    def _diagonal(self) -> Array:
        return jnp.full((self.dim,), self.scale)

    def _bands(self) -> tuple[Array, Array, Array]:
        off = jnp.zeros(max(self.dim - 1, 0), self.scale.dtype)
        return self._diagonal(), off, off

    # -- products --

    @handler("dot_general")
    def _dot_value(self, other: Value, /, *, dimension_numbers, **params):
        """`I @ V` is `scale * V`, dispatched again: it keeps `V`'s structure where
        `V`'s `mul` does."""
        how = _product(self, other, dimension_numbers, params, reflected=False)
        if how is None:
            return NotImplemented
        return _cast(quaxify(jnp.multiply)(self.scale, other), how[1])

    @handler("rdot_general")
    def _rdot_value(self, other: Value, /, *, dimension_numbers, **params):
        how = _product(self, other, dimension_numbers, params, reflected=True)
        if how is None:
            return NotImplemented
        return _cast(quaxify(jnp.multiply)(other, self.scale), how[1])

    def transpose(self, *, permutation=(1, 0), **params):
        return self

    # -- elementwise --

    @handler("mul", "rmul")
    def _scale(self, other: Scalar, /, **params):
        return Identity(self.dim, self.scale * other)

    @handler("mul", "rmul")
    def _mul_dense(self, other: Dense2D, /, **params):
        """A `Diagonal`: only the diagonal of the (broadcast) dense matrix is read."""
        n = self.dim
        return Diagonal(self.scale * jnp.diagonal(jnp.broadcast_to(other, (n, n))))

    @handler("div")
    def _div_scalar(self, other: Scalar, /, **params):
        return Identity(self.dim, _div(self.scale, other))

    def neg(self, **params):
        return Identity(self.dim, -self.scale)

    def convert_element_type(self, *, new_dtype, sharding=None, **params):
        if sharding is not None:
            return NotImplemented
        return Identity(self.dim, lax.convert_element_type(self.scale, new_dtype))

    @handler("add", "radd", "add_any", "radd_any")
    def _add(self, other: "Identity", /, **params):
        return Identity(self.dim, self.scale + other.scale)

    @handler("sub")
    def _sub(self, other: "Identity", /, **params):
        return Identity(self.dim, self.scale - other.scale)


class Kronecker(_Matrix):
    """The Kronecker product `jnp.kron(left, right)` of two matrices, each a dense
    array or a value (a `TridiagonalMatrix`, another `Kronecker`, ...): a product with
    a dense operand applies the factors one after the other, O(size of the factors)
    work per column instead of O(size of the product).

    | primitive | result |
    |---|---|
    | `dot_general` with a dense operand, either side | dense, through the factors' own rules |
    | `dot_general` with a `Kronecker` of conforming factors | `Kronecker` (mixed products) |
    | `transpose` | `Kronecker` of the transposed factors |
    | `mul` by a scalar, `div` by a scalar, `neg` | `Kronecker` (applied to `left`) |
    | `convert_element_type` | `Kronecker` |
    | `add`/`sub` (with a `Kronecker` too), anything else | materialised |

    A sum of Kronecker products is one only when they share a factor
    (`A ⊗ B + A ⊗ C = A ⊗ (B + C)`), and whether two traced factors are equal is
    known only when the program runs, not while quax traces it (two uses of one
    array reach a handler as distinct tracers): so `add` and `sub` materialise.
    """

    left: Any
    right: Any

    def __init__(self, left: Any, right: Any):
        """**Arguments:**

        - `left`, `right`: the two factors, 2-D arrays or 2-D values.
        """
        self.left = left if isinstance(left, Value) else jnp.asarray(left)
        self.right = right if isinstance(right, Value) else jnp.asarray(right)

    def __check_init__(self):
        for name in ("left", "right"):
            if len(_shape(getattr(self, name))) != 2:
                raise ValueError(
                    f"`Kronecker` expects a 2-D `{name}`, got shape "
                    f"{_shape(getattr(self, name))}."
                )

    def aval(self) -> jax.core.ShapedArray:
        (m, n), (p, q) = _shape(self.left), _shape(self.right)
        dtype = jnp.result_type(_dtype(self.left), _dtype(self.right))
        return jax.core.ShapedArray((m * p, n * q), dtype)

    def materialise(self) -> Array:
        return quaxify(jnp.kron)(self.left, self.right).astype(self.aval().dtype)

    def _apply(self, z: Array, transpose: bool) -> Array:
        left, right = self.left, self.right
        if transpose:
            left, right = _t(left), _t(right)
        (m, n), (p, q) = _shape(left), _shape(right)
        rest, dtype = z.shape[1:], z.dtype
        matmul = quaxify(jnp.matmul)  # the factors may be values: dispatch again
        z = z.reshape(n, q * _prod(rest))
        z = matmul(left, z).reshape(m, q, *rest)
        z = jnp.moveaxis(z, 1, 0).reshape(q, m * _prod(rest))
        z = matmul(right, z).reshape(p, m, *rest)
        return jnp.moveaxis(z, 0, 1).reshape(m * p, *rest).astype(dtype)

    # -- products --

    @handler("dot_general")
    def _dot_kronecker(self, other: "Kronecker", /, *, dimension_numbers, **params):
        """`(A ⊗ B) @ (C ⊗ D) = (A @ C) ⊗ (B @ D)` when the factors conform."""
        how = _product(self, other, dimension_numbers, params, reflected=False)
        if how is None:
            return NotImplemented
        transpose, dtype = how
        value = self.transpose(permutation=(1, 0)) if transpose else self
        conforming = _shape(value.left)[1] == _shape(other.left)[0] and (
            _shape(value.right)[1] == _shape(other.right)[0]
        )
        if not conforming:
            return NotImplemented
        matmul = quaxify(jnp.matmul)
        out = Kronecker(
            matmul(value.left, other.left), matmul(value.right, other.right)
        )
        return _cast(out, dtype)

    def transpose(self, *, permutation=(1, 0), **params):
        if tuple(permutation) == (0, 1):
            return self
        return Kronecker(_t(self.left), _t(self.right))

    # -- elementwise --

    @handler("mul", "rmul")
    def _scale(self, other: Scalar, /, **params):
        return Kronecker(quaxify(jnp.multiply)(self.left, other), self.right)

    @handler("div")
    def _div_scalar(self, other: Scalar, /, **params):
        if not jnp.issubdtype(self.dtype, jnp.inexact):
            return NotImplemented  # integer division does not distribute
        return Kronecker(quaxify(jnp.divide)(self.left, other), self.right)

    def neg(self, **params):
        return Kronecker(quaxify(jnp.negative)(self.left), self.right)

    def convert_element_type(self, *, new_dtype, sharding=None, **params):
        if sharding is not None:
            return NotImplemented

        def convert(x):
            return x.astype(new_dtype)

        return Kronecker(quaxify(convert)(self.left), quaxify(convert)(self.right))


def solve(matrix: TridiagonalMatrix | Diagonal | Identity, b: ArrayLike) -> Array:
    """Solve `matrix @ x = b` for `x` in O(n) per column.

    **Arguments:**

    - `matrix`: a `TridiagonalMatrix` (solved with `lax.linalg.tridiagonal_solve`,
        which does not pivot), a `Diagonal` or an `Identity`.
    - `b`: the right-hand side, shape `(n,)` or `(n, k)`.

    **Returns:** `x`, with the shape of `b`.
    """
    b = jnp.asarray(b)
    dtype = jnp.result_type(matrix.dtype, b.dtype)
    b = b.astype(dtype)
    if isinstance(matrix, Identity):
        return b / matrix.scale.astype(dtype)
    if isinstance(matrix, Diagonal):
        return b / _col(matrix.diagonal.astype(dtype), b)
    if not isinstance(matrix, TridiagonalMatrix):
        raise TypeError(
            "`quax.structured.solve` expects a TridiagonalMatrix, Diagonal or "
            f"Identity, got {type(matrix).__name__}."
        )
    d, lo, up = _cast_all(
        (matrix.diagonal, matrix.lower_diagonal, matrix.upper_diagonal), dtype
    )
    zero = jnp.zeros((1,), dtype)
    dl = jnp.concatenate([zero, lo])  # LAPACK layout: dl[0] and du[-1] are unused
    du = jnp.concatenate([up, zero])
    rhs = b if b.ndim == 2 else b[:, None]
    x = lax.linalg.tridiagonal_solve(dl, d, du, rhs)
    return x if b.ndim == 2 else x[:, 0]


# -- private helpers ------------------------------------------------------------------


def _dot_dtype(matrix: ArrayValue, other: Any, params: dict[str, Any]) -> Any:
    """The result dtype of a `dot_general`, or None to decline a sharded result.
    Products are formed at full precision, which meets any `precision`."""
    if params.get("out_sharding") is not None:
        return None
    preferred = params.get("preferred_element_type")
    if preferred is not None:
        return jnp.dtype(preferred)
    return jnp.result_type(matrix.dtype, other.dtype)


def _contraction(
    matrix: ArrayValue, other: Any, dimension_numbers: Any, params: Any, reflected: bool
) -> tuple[bool, int, Any] | None:
    """How a `dot_general` of `matrix` with a dense `other` runs: `(transpose, axis,
    dtype)` (apply `matrix.T` if `transpose`, to `other` with its contracted `axis`
    moved first; the result in `dtype`), or None to decline: batch dims, or more than
    one contracted axis."""
    dtype = _dot_dtype(matrix, other, params)
    (lc, rc), (lb, rb) = dimension_numbers
    mine, theirs = (rc, lc) if reflected else (lc, rc)
    if dtype is None or lb or rb or len(mine) != 1:
        return None
    # Contracting M's rows applies `M.T`: `M.T @ x`, or `x @ M = (M.T @ x.T).T`.
    return tuple(mine) == (0,), theirs[0], dtype


def _product(
    matrix: ArrayValue, other: Any, dimension_numbers: Any, params: Any, reflected: bool
) -> tuple[bool, Any] | None:
    """How a `dot_general` of `matrix` with another 2-D matrix `other` (a value) is a
    matrix product: `(transpose, dtype)` for `matrix @ other` (`other @ matrix` if
    `reflected`) with `matrix.T` in place of `matrix` if `transpose`; or None to
    decline (batch dims, `other` not 2-D or not contracted along its inner axis)."""
    how = _contraction(matrix, other, dimension_numbers, params, reflected)
    if how is None or len(_shape(other)) != 2 or how[1] != (1 if reflected else 0):
        return None
    # `other @ M` contracts M's rows: M itself (`other @ M.T` contracts its columns).
    return how[0] != reflected, how[2]


def _cast(x: Any, dtype: Any) -> Any:
    if x is NotImplemented or x.dtype == dtype:
        return x
    return quaxify(lambda v: v.astype(dtype))(x)


def _cast_all(arrays: tuple[Array, ...], dtype: Any) -> tuple[Array, ...]:
    return tuple(a.astype(dtype) for a in arrays)


def _col(v: Array, like: Array) -> Array:
    """A vector along axis 0, shaped to broadcast against `like`."""
    return v.reshape(v.shape[0], *(1,) * (like.ndim - 1))


def _is_lu_solve(closed_jaxpr: Any) -> bool:
    """Whether a `jit` body is `jnp.linalg.solve`'s: an `lu` factorisation followed by
    a `custom_linear_solve`."""
    names = {eqn.primitive.name for eqn in closed_jaxpr.jaxpr.eqns}
    return {"lu", "custom_linear_solve"} <= names


def _t(x: Any) -> Any:
    return quaxify(jnp.transpose)(x)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _dtype(x: Any) -> Any:
    return x.dtype


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _div(x: Array, scalar: ArrayLike) -> Array:
    """`lax.div` by a scalar (integer division truncates, as the primitive does)."""
    return lax.div(x, jnp.broadcast_to(scalar, x.shape).astype(x.dtype))
