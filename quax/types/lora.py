"""LoRA: a weight `w` plus a trainable low-rank update `a @ b`, never formed densely.

`LoraArray` handles `dot_general` (both sides, any dimension numbers that contract one
of the matrix axes) as `w·x + a·(b·x)`, and `transpose`, `neg`, `convert_element_type`,
and multiplication or division by a scalar by keeping the structure. Everything else
materialises `w + a @ b` if `allow_materialise=True`, and is an error otherwise.
"""

import re
import typing
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree, Shaped

from .._values import ArrayValue


_MSG_REFUSE_MATERIALISE = """\
Refusing to materialise a `LoraArray` of shape {shape} (it was made with \
`allow_materialise=False`): this operation has no low-rank rule, and running it would \
form the dense matrix `w + a @ b`.
To fix: pass `allow_materialise=True` to `quax.lora.loraify` or `LoraArray`, call \
`quax.lora.merge(model)` before this code, or express the operation as a matrix \
product with the weight."""


class LoraArray(ArrayValue):
    """A matrix `w` (shape `(*batch, n, m)`) adapted by a low-rank update:
    `w + scaling * a @ b`, with `a` of shape `(*batch, n, rank)` and `b` of shape
    `(*batch, rank, m)`. The three parts are stored separately; `w` is frozen (its
    gradient stopped) unless `stop_gradient=False`.

    Handles: `dot_general`/`rdot_general` (as `w·x + a·(b·x)`, never forming `a @ b`),
    `transpose`, `neg`, `convert_element_type` (to floating dtypes), and `mul`/`rmul`/
    `div` by a scalar. Anything else materialises `w + scaling * a @ b` if
    `allow_materialise=True`, and raises otherwise.
    """

    w: Shaped[Array, "*batch n m"]
    a: Shaped[Array, "*batch n rank"]
    b: Shaped[Array, "*batch rank m"]
    scaling: float = eqx.field(static=True)
    frozen: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)

    def __init__(
        self,
        weight: Shaped[Array, "*batch n m"],
        *,
        rank: int,
        scale: float = 0.01,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        key: PRNGKeyArray,
        alpha: float | None = None,
        dtype: Any = None,
    ):
        """**Arguments:**

        - `weight`: the weight to adapt, of shape `(*batch, n, m)`.
        - `rank`: the rank of the update.
        - `scale`: `a` starts as `Normal(0, scale**2)`; `b` starts at zero, so the
            adapted matrix starts equal to `weight`.
        - `allow_materialise`: if an operation has no low-rank rule, form
            `w + a @ b` densely (`True`) or raise an error (`False`, the default).
        - `stop_gradient`: freeze `weight`: no gradient flows to it.
        - `key`: a JAX PRNG key, to initialise `a`.
        - `alpha`: if given, the update is scaled by `alpha / rank` (as in the LoRA
            paper and peft); otherwise by 1.
        - `dtype`: the dtype of `a` and `b` (default: that of `weight`), e.g. float32
            adapters on bfloat16 weights.
        """
        weight = jnp.asarray(weight)
        if weight.ndim < 2:
            raise ValueError(
                "`LoraArray` expects `weight` of shape (*batch, n, m), with at least "
                f"two axes, but got shape {weight.shape}."
            )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"`LoraArray` expects a positive int `rank`, got {rank!r}."
            )
        *batch, n, m = weight.shape
        dtype = weight.dtype if dtype is None else jnp.dtype(dtype)
        self.w = weight
        self.a = (jr.normal(key, (*batch, n, rank), dtype=dtype) * scale).astype(dtype)
        self.b = jnp.zeros((*batch, rank, m), dtype=dtype)
        self.scaling = 1.0 if alpha is None else float(alpha) / rank
        self.frozen = stop_gradient
        self.allow_materialise = allow_materialise

    def __check_init__(self):
        w_shape, a_shape, b_shape = _shape(self.w), _shape(self.a), _shape(self.b)
        if len(w_shape) < 2:
            raise ValueError(
                f"`LoraArray.w` must have shape (*batch, n, m), got shape {w_shape}."
            )
        *batch, n, m = w_shape
        if len(a_shape) != len(w_shape) or tuple(a_shape[:-1]) != (*batch, n):
            raise ValueError(
                f"`LoraArray.a` must have shape {(*batch, n, 'rank')} to match `w` of "
                f"shape {w_shape}, got shape {a_shape}."
            )
        rank = a_shape[-1]
        if tuple(b_shape) != (*batch, rank, m):
            raise ValueError(
                f"`LoraArray.b` must have shape {(*batch, rank, m)} to match `w` of "
                f"shape {w_shape} and `a` of shape {a_shape}, got shape {b_shape}."
            )

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self) -> Shaped[Array, "*batch n m"]:
        if not self.allow_materialise:
            raise RuntimeError(_MSG_REFUSE_MATERIALISE.format(shape=self.w.shape))
        return self._dense(frozen=self.frozen)

    def _dense(self, *, frozen: bool) -> Shaped[Array, "*batch n m"]:
        w = lax.stop_gradient(self.w) if frozen else self.w
        update = jnp.matmul(self.a, self.b)
        if self.scaling != 1.0:
            update = update * jnp.asarray(self.scaling, update.dtype)
        return w + update.astype(w.dtype)

    def scan_leafwise(self) -> bool:
        """A stack of adapted matrices (`w` of shape `(layers, ..., n, m)`) is scanned
        over one `LoraArray` per layer, so LoRA's handlers run in the scanned body; a
        single matrix (whose `b` has no layer axis) never is."""
        return self.w.ndim >= 3

    # -- linear algebra --

    def dot_general(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`(w + a b)·x` as `w·x + a·(b·x)` (or `(a·x)·b` when `n` is contracted);
        declines when neither matrix axis is contracted."""
        return _lora_dot(self, other, dimension_numbers, params, lora_is_lhs=True)

    def rdot_general(self, other: ArrayLike, /, *, dimension_numbers, **params):
        """`x·(w + a b)`: self is operand 1 here."""
        return _lora_dot(self, other, dimension_numbers, params, lora_is_lhs=False)

    # -- shape --

    def transpose(self, /, *, permutation, **params):
        """Permutes the batch axes and may swap the matrix axes (`w.T = w.T + b.T a.T`);
        declines permutations that mix batch and matrix axes."""
        k = self.w.ndim
        perm = tuple(int(p) for p in permutation)
        if set(perm[-2:]) != {k - 2, k - 1}:
            return NotImplemented
        w = lax.transpose(self.w, perm)
        if perm[-2:] == (k - 2, k - 1):
            return _replace(
                self, w, lax.transpose(self.a, perm), lax.transpose(self.b, perm)
            )
        return _replace(
            self, w, lax.transpose(self.b, perm), lax.transpose(self.a, perm)
        )

    # -- elementwise --

    def neg(self, /, **params):
        return _replace(self, -self.w, -self.a, self.b)

    def mul(self, other: ArrayLike, /, **params):
        """`c * (w + a b) = c w + (c a) b` for a scalar `c`; declines arrays."""
        if jnp.shape(other) != ():
            return NotImplemented
        # The frozen weight is scaled after its gradient is stopped, so the gradient
        # still reaches `c` (and never `w`): the result holds no frozen weight.
        return _replace(
            self,
            _frozen(self) * _cast(other, self.w.dtype),
            self.a * _cast(other, self.a.dtype),
            self.b,
            frozen=False,
        )

    rmul = mul

    def div(self, other: ArrayLike, /, **params):
        if jnp.shape(other) != ():
            return NotImplemented
        return _replace(
            self,
            _frozen(self) / _cast(other, self.w.dtype),
            self.a / _cast(other, self.a.dtype),
            self.b,
            frozen=False,
        )

    def convert_element_type(self, /, *, new_dtype, **params):
        """Converts `w`; the adapters keep their own (floating) dtype."""
        if not jnp.issubdtype(new_dtype, jnp.floating):
            return NotImplemented
        return _replace(
            self, lax.convert_element_type(self.w, new_dtype), self.a, self.b
        )

    # -- derivatives (ArrayValue.pushforward/pullback): low rank, never `w + a @ b` --

    def pushforward(self, tangent: "LoraArray") -> Array:
        """`dw + s (da b + a db)` (`dw` dropped when `w` is frozen)."""
        update = jnp.matmul(tangent.a, self.b) + jnp.matmul(self.a, tangent.b)
        if self.scaling != 1.0:
            update = update * jnp.asarray(self.scaling, update.dtype)
        update = update.astype(self.w.dtype)
        return update if self.frozen else tangent.w + update

    def pullback(self, cotangent: Array) -> "LoraArray":
        """`(ct, s ct bᵀ, s aᵀ ct)`, with no cotangent for a frozen `w`."""
        ct = cotangent.astype(self.a.dtype)
        if self.scaling != 1.0:
            ct = ct * jnp.asarray(self.scaling, ct.dtype)
        ct_a = jnp.matmul(ct, jnp.swapaxes(self.b, -1, -2))
        ct_b = jnp.matmul(jnp.swapaxes(self.a, -1, -2), ct)
        ct_w = None if self.frozen else cotangent
        return jtu.tree_unflatten(jtu.tree_structure(self), [ct_w, ct_a, ct_b])


# -- public functions ---------------------------------------------------------------


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraArray)


def _is_linear(x: Any) -> bool:
    return isinstance(x, eqx.nn.Linear)


def loraify(
    model: PyTree,
    *,
    rank: int,
    scale: float = 0.01,
    allow_materialise: bool = False,
    stop_gradient: bool = True,
    key: PRNGKeyArray,
    where: Callable[[eqx.nn.Linear], bool] | str | Sequence[str] | None = None,
    alpha: float | None = None,
    dtype: Any = None,
) -> PyTree:
    """Replace the weight of every `eqx.nn.Linear` in `model` (anywhere in the pytree,
    including inside `eqx.nn.MultiheadAttention`) by a `LoraArray`.

    **Arguments:**

    - `model`: any pytree, typically an equinox Module.
    - `rank`, `scale`, `allow_materialise`, `stop_gradient`, `alpha`, `dtype`: as for
        `LoraArray`.
    - `key`: a JAX PRNG key; each adapted layer gets its own subkey.
    - `where`: which layers to adapt (default: every `Linear`). Either a predicate on
        the `eqx.nn.Linear` layer; or, as peft's `target_modules`, a string (a regular
        expression that must match the layer's whole path, e.g.
        `r".*attn\\.(query|value)_proj"`) or a list of strings (a layer is adapted if
        its path equals one of them or ends with `"." + name`). Paths are written
        as in PyTorch: `"blocks.0.attn.query_proj"`.

    **Returns:**

    A copy of `model` whose selected linear weights are `LoraArray`s. Call it through
    `quax.quaxify(model)(...)`; train only the adapters with
    `eqx.partition(model, quax.lora.trainable(model))`.
    """
    select = _selector(where)
    flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=_is_linear)
    chosen = [
        i
        for i, (path, leaf) in enumerate(flat)
        if _is_linear(leaf)
        and not is_lora(leaf.weight)
        and select(_path_str(path), leaf)
    ]
    keys = jr.split(key, max(len(chosen), 1))
    leaves = [leaf for _, leaf in flat]
    for i, subkey in zip(chosen, keys, strict=False):
        layer = leaves[i]
        weight = LoraArray(
            layer.weight,
            rank=rank,
            scale=scale,
            allow_materialise=allow_materialise,
            stop_gradient=stop_gradient,
            key=subkey,
            alpha=alpha,
            dtype=dtype,
        )
        leaves[i] = eqx.tree_at(lambda layer: layer.weight, layer, weight)
    return jtu.tree_unflatten(treedef, leaves)


def merge(model: PyTree) -> PyTree:
    """Replace every `LoraArray` in `model` by the dense array `w + scaling * a @ b`,
    for deployment without quax.

    **Returns:**

    A copy of `model` with plain arrays in place of `LoraArray`s.
    """
    return jtu.tree_map(
        lambda x: x._dense(frozen=False) if is_lora(x) else x, model, is_leaf=is_lora
    )


def trainable(model: PyTree) -> PyTree:
    """A filter selecting exactly the adapter parameters (`a` and `b` of each
    `LoraArray`) of `model`: a pytree of bools, for `eqx.partition` and
    `optax.masked`.

    **Returns:**

    A pytree with the structure of `model`: `True` at every `LoraArray`'s `a` and `b`,
    `False` everywhere else (including `w`).

    !!! Example

        ```python
        params, static = eqx.partition(model, quax.lora.trainable(model))
        ```
    """

    def spec(x: Any) -> Any:
        if is_lora(x):
            return eqx.tree_at(
                lambda lora: (lora.w, lora.a, lora.b), x, (False, True, True)
            )
        return False

    return jtu.tree_map(spec, model, is_leaf=is_lora)


# -- private helpers ------------------------------------------------------------------


def _frozen(lora: LoraArray) -> Array:
    """`w`, with its gradient stopped if it is frozen."""
    return lax.stop_gradient(lora.w) if lora.frozen else lora.w


def _replace(
    lora: LoraArray, w: Array, a: Array, b: Array, *, frozen: bool | None = None
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
    return tuple(jnp.shape(x))


def _cast(x: ArrayLike, dtype: Any) -> Array:
    return lax.convert_element_type(x, dtype)


def _path_str(path: Sequence[Any]) -> str:
    return jtu.keystr(tuple(path), simple=True, separator=".")


def _selector(where: Any) -> Callable[[str, Any], bool]:
    if where is None:
        return lambda path, layer: True
    if isinstance(where, str):
        pattern = re.compile(where)
        return lambda path, layer: pattern.fullmatch(path) is not None
    if isinstance(where, Sequence):
        names = tuple(where)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(
                "`loraify(where=...)` takes a predicate on the layer, a regular "
                f"expression, or a list of path names; got {where!r}."
            )
        return lambda path, layer: any(
            path == n or path.endswith("." + n) for n in names
        )
    if callable(where):
        return lambda path, layer: bool(where(layer))
    raise TypeError(
        "`loraify(where=...)` takes a predicate on the layer, a regular expression, or "
        f"a list of path names; got {where!r} of type {type(where).__name__}."
    )


Label = Hashable


def _lora_dot(
    lora: LoraArray,
    other: ArrayLike,
    dimension_numbers: Any,
    params: dict[str, Any],
    *,
    lora_is_lhs: bool,
) -> Any:
    """`dot_general` with `lora` on one side, as a dense product with `w` plus two
    thin products with the adapters, contracting `x` against the adapter on the side
    of a contracted matrix axis first."""
    ((lhs_c, rhs_c), (lhs_b, rhs_b)) = dimension_numbers
    if lora_is_lhs:
        lora_c, x_c, lora_b, x_b = lhs_c, rhs_c, lhs_b, rhs_b
    else:
        lora_c, x_c, lora_b, x_b = rhs_c, lhs_c, rhs_b, lhs_b
    k = lora.w.ndim
    if k == 2 and not lora_b and len(lora_c) == 1:
        x = typing.cast(Array, other)  # handlers receive JAX arrays (see _dispatch)
        return _lora_dot_2d(lora, x, lora_c[0], x_c[0], params, lora_is_lhs)
    n_axis, m_axis = k - 2, k - 1
    if m_axis in lora_c:
        first, second = "b", "a"
    elif n_axis in lora_c:
        first, second = "a", "b"
    else:
        return NotImplemented  # no matrix axis contracted: the update would be formed

    x = jnp.asarray(other)
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
        "a": lora_labels[:m_axis] + [rank_label],
        "b": lora_labels[:n_axis] + [rank_label, lora_labels[m_axis]],
    }
    lhs, rhs = (_frozen(lora), x) if lora_is_lhs else (x, _frozen(lora))
    dense = lax.dot_general_p.bind(
        lhs, rhs, dimension_numbers=dimension_numbers, **params
    )

    dtype = jnp.promote_types(lora.a.dtype, x.dtype)
    adapters = {"a": lora.a.astype(dtype), "b": lora.b.astype(dtype)}
    precision = params.get("precision")
    keep = set(out_labels) | set(labels[second])
    t_labels = [lab for lab in _unique(labels[first] + x_labels) if lab in keep]
    t = _contract(
        adapters[first], labels[first], x.astype(dtype), x_labels, t_labels, precision
    )
    if lora.scaling != 1.0:
        t = t * jnp.asarray(lora.scaling, t.dtype)
    update = _contract(
        adapters[second], labels[second], t, t_labels, out_labels, precision
    )
    return dense + update.astype(dense.dtype)


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
    primitives bound directly (this runs once per linear layer on every trace)."""
    w = _frozen(lora)
    lhs, rhs = (w, x) if lora_is_lhs else (x, w)
    contract = ((lora_axis,), (x_axis,)) if lora_is_lhs else ((x_axis,), (lora_axis,))
    dense = lax.dot_general_p.bind(
        lhs, rhs, dimension_numbers=(contract, ((), ())), **params
    )
    dtype = jnp.promote_types(lora.a.dtype, x.dtype)
    precision = params.get("precision")
    x = lax.convert_element_type(x, dtype)
    a = lax.convert_element_type(lora.a, dtype)
    b = lax.convert_element_type(lora.b, dtype)
    # `first` meets x; `second` then meets the rank axis of the thin product.
    if lora_axis == 1:  # m contracted: (b x), then a
        first, first_axis, second, second_axis = b, 1, a, 1
    else:  # n contracted: (a x), then b
        first, first_axis, second, second_axis = a, 0, b, 0

    def dot(u, v, cu, cv):
        return lax.dot_general(
            u,
            v,
            (((cu,), (cv,)), ((), ())),
            precision=precision,
            preferred_element_type=dtype,
        )

    if lora_is_lhs:
        t = dot(first, x, first_axis, x_axis)  # (rank, *x_free)
        update = dot(second, t, second_axis, 0)  # (lora_free, *x_free)
    else:
        t = dot(x, first, x_axis, first_axis)  # (*x_free, rank)
        update = dot(t, second, t.ndim - 1, second_axis)  # (*x_free, lora_free)
    if lora.scaling != 1.0:
        update = update * jnp.asarray(lora.scaling, update.dtype)
    return dense + lax.convert_element_type(update, dense.dtype)


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
