"""One builder per array-ish type: `make_<kind>(key) -> (value, dense array)`.

Generic tests run `@pytest.mark.parametrize("kind", sorted(BUILDERS))`: the values of
`BUILDERS` are arrays of numbers as far as any `jax.numpy` function is concerned.
`FUZZ_BUILDERS` adds the types whose values are not (PRNG keys: no arithmetic;
quantities: a unit error for a formula that mixes units): the fuzzer draws only the
operations JAX accepts on the dense array, and judges their refusals (see
`tests/fuzz/check.py`); `numbers(x)` is what is compared for any value.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.random as jr

import quax


BUILDERS: dict[str, Callable[[Any], tuple[quax.ArrayValue, jax.Array]]] = {}


FUZZ_BUILDERS: dict[str, Callable[[Any], tuple[quax.ArrayValue, jax.Array]]] = {}


def builder(fn):
    BUILDERS[fn.__name__.removeprefix("make_")] = fn
    FUZZ_BUILDERS[fn.__name__.removeprefix("make_")] = fn
    return fn


def fuzz_builder(fn):
    """A builder only the fuzzer runs (see the module docstring)."""
    FUZZ_BUILDERS[fn.__name__.removeprefix("make_")] = fn
    return fn


def numbers(x: Any) -> Any:
    """What a value is compared as: its `materialise()`d array, except for a quantity
    (`quax.units.Unitful`, which never materialises): its numbers in base units
    (`array * unit.scale`), which are the dense array's for a value built in a unit
    of scale 1."""
    from quax.units import Unitful

    if isinstance(x, Unitful):
        return x.array * jnp.asarray(x.unit.scale, x.array.dtype)
    return x.materialise()


class Ruleless(quax.ArrayValue):
    """A type with no handlers at all: everything materialises."""

    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array


class Scaled(quax.ArrayValue):
    """`factor * array`, a value whose materialise is computed; handles `mul` and
    `neg` by keeping the structure."""

    array: jax.Array
    factor: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.factor * self.array

    def mul(self, other: jax.Array, /, **params):
        if other.shape != ():
            return NotImplemented
        return Scaled(self.array, self.factor * other)

    rmul = mul

    def neg(self, **params):
        return Scaled(self.array, -self.factor)


class Pair(quax.ArrayValue):
    """A nested value: the sum of two values."""

    left: quax.ArrayValue
    right: quax.ArrayValue

    def aval(self):
        return self.left.aval()

    def materialise(self):
        return quax.quaxify(jnp.add)(self.left, self.right)


class StaticZero(quax.ArrayValue):
    """A symbolic zero for tests of the protocol (the real one is quax.zero.Zero)."""

    shape_: tuple[int, ...] = eqx.field(static=True)
    dtype_: Any = eqx.field(static=True)

    def aval(self):
        return jax.core.ShapedArray(self.shape_, self.dtype_)

    def materialise(self):
        return jnp.zeros(self.shape_, self.dtype_)


class Opaque(quax.ArrayValue):
    """A value that never materialises: what quax does without a handler is an error."""

    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        raise ValueError("Opaque never materialises")


@builder
def make_ruleless(key):
    x = jr.normal(key, (3, 4))
    return Ruleless(x), x


@builder
def make_scaled(key):
    x = jr.normal(key, (3, 4))
    return Scaled(x, jnp.asarray(2.0)), 2.0 * x


@builder
def make_nested(key):
    k1, k2 = jr.split(key)
    a, b = jr.normal(k1, (3, 4)), jr.normal(k2, (3, 4))
    return Pair(Ruleless(a), Scaled(b, jnp.asarray(0.5))), a + 0.5 * b


#: Every `LowRank.materialise()` call appends the value's shape here.
LOWRANK_MATERIALISED: list[tuple[int, ...]] = []


class LowRank(quax.ArrayValue):
    """`w + a @ b` (LoRA-like; `materialise` is nonlinear in the leaves). Handles
    `x @ v` without materialising, and opts in to leaf-by-leaf scanning, so a stack of
    layers (leading axis on every leaf) can be scanned over."""

    w: jax.Array
    a: jax.Array
    b: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self):
        LOWRANK_MATERIALISED.append(tuple(self.w.shape))
        return self.w + self.a @ self.b

    def rdot_general(self, x: jax.Array, /, *, dimension_numbers, **params):
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
        standard = (
            self.w.ndim == 2
            and tuple(rhs_contract) == (0,)
            and tuple(lhs_contract) == (x.ndim - 1,)
            and not lhs_batch
            and not rhs_batch
        )
        if not standard:
            return NotImplemented
        return x @ self.w + (x @ self.a) @ self.b

    def scan_leafwise(self):
        return True


def make_lowrank(key, shape=(3, 4), rank=2):
    k1, k2, k3 = jr.split(key, 3)
    *batch, n, m = shape
    w = jr.normal(k1, shape)
    a = jr.normal(k2, (*batch, n, rank))
    b = jr.normal(k3, (*batch, rank, m))
    return LowRank(w, a, b), w + a @ b


@builder
def make_lora(key):
    from quax.lora import LoraArray

    kw, ka, kb = jr.split(key, 3)
    lora = LoraArray(jr.normal(kw, (3, 4)), rank=2, allow_materialise=True, key=ka)
    lora = eqx.tree_at(lambda x: x.b, lora, jr.normal(kb, (2, 4)))
    return lora, lora.w + lora.a @ lora.b


@builder
def make_zero(key):
    from quax.zero import Zero

    del key
    return Zero((3, 4), jnp.float32), jnp.zeros((3, 4), jnp.float32)


@builder
def make_quantized(key):
    from quax.quantized import dequantize, quantize

    wq = quantize(jr.normal(key, (3, 4)), bits=4, group_size=2)
    return wq, dequantize(wq)


@builder
def make_lora_on_quantized(key):
    from quax.lora import LoraArray
    from quax.quantized import dequantize, quantize

    kw, ka, kb = jr.split(key, 3)
    wq = quantize(jr.normal(kw, (3, 4)), bits=8)
    lora = LoraArray(wq, rank=2, allow_materialise=True, key=ka)
    lora = eqx.tree_at(lambda x: x.b, lora, jr.normal(kb, (2, 4)))
    return lora, dequantize(wq) + lora.a @ lora.b


@builder
def make_named(key):
    from quax.named import NamedArray

    x = jr.normal(key, (3, 4))
    return NamedArray(x, ("a", "b"), allow_materialise=True), x


@builder
def make_sparse(key):
    """A 3 x 4 `quax.sparse.BCOO` with two of its twelve entries unstored."""
    from quax.sparse import BCOO

    x = jr.normal(key, (3, 4)).at[0, 1].set(0.0).at[2, 3].set(0.0)
    return BCOO.fromdense(x, allow_materialise=True), x


@builder
def make_tridiagonal(key):
    """A 4 x 4 `quax.structured.TridiagonalMatrix`."""
    from quax.structured import TridiagonalMatrix

    d, lo, up = jr.normal(key, (3, 4))
    value = TridiagonalMatrix(d, lo[:3], up[:3])
    return value, value.materialise()


@fuzz_builder
def make_prng(key):
    """A 3 x 4 batch of `quax.prng.ThreeFry` keys, and JAX's keys with the same bits."""
    from quax.prng import ThreeFry

    seed = jr.randint(key, (3, 4), 0, 2**31 - 1)
    value = ThreeFry(seed)
    return value, value.materialise()


@fuzz_builder
def make_units(key):
    """A 3 x 4 quantity (in metres, or metres per second: units of scale 1, so its
    numbers in base units are its array) and its array."""
    from quax.units import Unitful, m, s

    k1, k2 = jr.split(key)
    x = jr.normal(k1, (3, 4))
    unit = m if jr.bernoulli(k2) else m / s
    return Unitful(x, unit), x
