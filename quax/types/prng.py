"""PRNG keys as values: a key's raw bits, which `jax.random` functions accept under
`quax.quaxify` as they accept JAX's own typed keys.

Inside `quaxify`, a key traces as JAX's typed key array (`key<fry>`), so `jax.random`
and `jnp.where` work unchanged and arithmetic is refused while tracing (a `TypeError`,
as for JAX's keys). Every primitive on the key is then run on JAX's typed key built
from the raw bits, and keys that come out are wrapped back.
"""

import abc
import functools as ft
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._quaxify import quaxify
from .._table import handler, not_handler
from .._values import ArrayValue


_MSG_ARITHMETIC = (
    "quax: `{op}` on a {cls} is not defined: a PRNG key is not a number.\n"
    "To fix: draw numbers from it (`jax.random.uniform(key, ...)` under "
    "`quax.quaxify`), or split it (`key.split(n)`, `key.fold_in(i)`)."
)


@ft.cache
def _key_dtype(impl: str) -> Any:
    """The dtype of JAX's typed keys of `impl` (`key<fry>` for threefry)."""
    return jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype


@ft.cache
def _data_ndim(impl: str) -> int:
    """How many trailing axes the raw bits of one key of `impl` have."""
    key = jax.eval_shape(lambda: jax.random.key(0, impl=impl))
    return len(jax.eval_shape(jax.random.key_data, key).shape)


def _is_key_of(x: Any, impl: str) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and dtype == _key_dtype(impl)


def _refuse(op: str) -> Any:
    """A Python operator that raises: keys have no arithmetic."""

    def refuse(self: "PRNG", *args: Any) -> Any:
        raise TypeError(_MSG_ARITHMETIC.format(op=op, cls=type(self).__name__))

    return refuse


class PRNG(ArrayValue):
    """A PRNG key held as its raw bits (the Quax library's abstract `PRNG`).

    Subclasses fix `impl`, the name of a `jax.random` implementation. The key's shape
    (`key.shape`) is the batch shape: `data` has that shape plus the implementation's
    own trailing axes.

    | primitive | result |
    |---|---|
    | `random_bits`, `random_unwrap` | plain arrays (bits, the key's data) |
    | `random_split`, `random_fold_in` (key by key for a batch of keys, as under `vmap`) | keys of this class |
    | `select_n` (`jnp.where`), any operand position | a key of this class |
    | any other primitive JAX defines on keys (`broadcast_in_dim`, `reshape`, `squeeze`, `slice`, `dynamic_slice`, `gather`, `concatenate`, `copy`, ...) | run on JAX's typed key; keys come back as this class (`default`) |
    | arithmetic, comparisons | `TypeError` while tracing (JAX refuses them on keys) |
    | `lax.scan` `xs`/`ys`, `cond`, `while` | kept (sliced and stacked leaf by leaf) |

    `materialise()` is JAX's typed key with the same bits, so a program on this key
    gives the numbers the same program gives on `jax.random.wrap_key_data(key.data)`.
    """

    data: eqx.AbstractVar[Array]
    impl: ClassVar[str]

    # -- what JAX sees -------------------------------------------------------------

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self._batch_shape(), _key_dtype(self.impl))

    def materialise(self) -> Array:
        return jax.random.wrap_key_data(self.data, impl=self.impl)

    def _batch_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[: self.data.ndim - _data_ndim(self.impl)])

    def _rewrap(self, out: Any) -> Any:
        """JAX's typed key `out` as a key of this class; anything else unchanged."""
        if not _is_key_of(out, self.impl):
            return out
        return eqx.tree_at(lambda k: k.data, self, jax.random.key_data(out))

    def scan_leafwise(self) -> bool:
        # `data` has the key's batch axes first: slicing or stacking it along axis 0
        # slices or stacks the keys.
        return True

    # -- the user-level API (as the Quax library's PRNG) --------------------------------

    @not_handler  # the primitive's handler is `_random_bits` below
    @abc.abstractmethod
    def random_bits(self, bit_width: int, shape: tuple[int, ...]) -> Array:
        """Random unsigned integers of `bit_width` bits and shape `key.shape + shape`
        (`jax.random.bits`, `uniform`, `normal`, ... reach it under `quaxify`)."""

    @not_handler  # `split` is also `lax.split`'s handler name
    def split(self, num: int = 2) -> tuple["PRNG", ...]:
        """`num` independent keys, as a tuple (`jax.random.split(key, num)` under
        `quaxify` gives one key of shape `(num,)` instead)."""
        keys = jax.random.split(self.materialise(), num)
        return tuple(self._rewrap(k) for k in keys)

    def fold_in(self, data: ArrayLike) -> "PRNG":
        """A new key from this one and an integer, as `jax.random.fold_in`."""
        return self._rewrap(jax.random.fold_in(self.materialise(), data))

    # -- handlers ------------------------------------------------------------------

    @handler("random_bits")
    def _random_bits(self, /, *, bit_width: int, shape: tuple[int, ...]) -> Array:
        return self.random_bits(bit_width, shape)

    def random_split(self, /, *, shape: tuple[int, ...]) -> "PRNG":
        # The primitive, not `jax.random.split`: it splits a batch of keys (under
        # `vmap`) key by key, where `jax.random.split` accepts a single key only.
        return self._rewrap(
            jexc.primitives.random_split_p.bind(self.materialise(), shape=shape)
        )

    def random_fold_in(self, msgs: ArrayLike, /) -> "PRNG":
        return self._rewrap(
            jexc.primitives.random_fold_in_p.bind(self.materialise(), msgs)
        )

    # `random_unwrap` (`jax.random.key_data`) is not among the primitives JAX exports,
    # so a method of that name alone would not be recognised as its handler.
    @handler("random_unwrap")
    def _key_data(self, /, **params: Any) -> Array:
        return self.data

    @handler("select_n", operands="all")
    @staticmethod
    def _where(which: ArrayLike, *cases: "PRNG", **params: Any) -> "PRNG":
        """`jnp.where(c, k1, k2)`, `lax.select_n`: the keys chosen, bits by bits."""
        like = cases[0]
        if any(type(k) is not type(like) for k in cases):
            return NotImplemented
        datas = [k.data for k in cases]
        # The predicate has the keys' batch shape; the bits have trailing axes.
        pred = jnp.asarray(which)
        pred = pred.reshape(*pred.shape, *([1] * _data_ndim(like.impl)))
        pred = jnp.broadcast_to(pred, datas[0].shape)
        out = jax.lax.select_n(pred, *datas)
        return eqx.tree_at(lambda k: k.data, like, out)

    @staticmethod
    def default(
        primitive: jexc.Primitive, operands: tuple[Any, ...], params: dict[str, Any]
    ) -> Any:
        """Any other primitive JAX defines on keys (`broadcast_in_dim`,
        `reshape`, `slice`, `concatenate`, ...): run on JAX's typed keys, keys out
        wrapped back as the class of the first key operand."""
        keys = [x for x in operands if isinstance(x, PRNG)]
        like = keys[0]
        if any(type(k) is not type(like) for k in keys):
            return NotImplemented
        dense = [x.materialise() if isinstance(x, PRNG) else x for x in operands]
        out = primitive.bind(*dense, **params)
        if primitive.multiple_results:
            return [like._rewrap(o) for o in out]
        return like._rewrap(out)

    # -- arithmetic is an error, with a message, also outside quaxify --------------------

    __add__ = __radd__ = _refuse("+")
    __sub__ = __rsub__ = _refuse("-")
    __mul__ = __rmul__ = _refuse("*")
    __truediv__ = __rtruediv__ = _refuse("/")
    __floordiv__ = __rfloordiv__ = _refuse("//")
    __mod__ = __rmod__ = _refuse("%")
    __pow__ = __rpow__ = _refuse("**")
    __matmul__ = __rmatmul__ = _refuse("@")
    __neg__ = _refuse("-")
    __pos__ = _refuse("+")
    __abs__ = _refuse("abs")
    __invert__ = _refuse("~")
    __lt__ = _refuse("<")
    __le__ = _refuse("<=")
    __gt__ = _refuse(">")
    __ge__ = _refuse(">=")


class ThreeFry(PRNG):
    """A threefry2x32 key (JAX's default), as the Quax library's `ThreeFry`."""

    data: Array
    impl: ClassVar[str] = "threefry2x32"

    def __init__(self, seed: ArrayLike):
        """**Arguments:**

        - `seed`: an integer (or an integer array, for a batch of keys) to seed the
            key with, as `jax.random.key(seed)`.
        """
        seed = jnp.asarray(seed)

        def one(s: Array) -> Array:
            return jax.random.key_data(jax.random.key(s, impl=self.impl))

        flat = jax.vmap(one)(seed.reshape(-1))
        self.data = flat.reshape(*seed.shape, *flat.shape[1:])

    @not_handler
    def random_bits(self, bit_width: int, shape: Sequence[int]) -> Array:
        return jexc.primitives.random_bits_p.bind(
            self.materialise(), bit_width=bit_width, shape=tuple(shape)
        )


def from_key(key: Array) -> ThreeFry:
    """A `ThreeFry` holding the bits of JAX's threefry key `key` (any shape)."""
    if not _is_key_of(key, ThreeFry.impl):
        raise TypeError(
            f"quax: `from_key` expects a threefry key from `jax.random.key`, got "
            f"{getattr(key, 'dtype', type(key).__name__)}.\n"
            "To fix: pass `jax.random.key(seed)`, or use `ThreeFry(seed)`."
        )
    out = ThreeFry(0)
    return eqx.tree_at(lambda k: k.data, out, jax.random.key_data(key))


def split(key: PRNG, num: int = 2) -> tuple[PRNG, ...]:
    """`key.split(num)`: `num` independent keys (the Quax library's `split`)."""
    return key.split(num)


def uniform(
    key: PRNG,
    shape: tuple[int, ...] = (),
    dtype: Any = float,
    minval: ArrayLike = 0.0,
    maxval: ArrayLike = 1.0,
) -> Array:
    """`jax.random.uniform` on a key of this module (the Quax library's `uniform`)."""
    return quaxify(jax.random.uniform)(key, shape, dtype, minval, maxval)


def normal(key: PRNG, shape: tuple[int, ...] = (), dtype: Any = float) -> Array:
    """`jax.random.normal` on a key of this module (the Quax library's `normal`)."""
    return quaxify(jax.random.normal)(key, shape, dtype)
