"""One builder per array-ish type: `make_<kind>(key) -> (value, dense array)`.

Generic tests run `@pytest.mark.parametrize("kind", sorted(BUILDERS))`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import quax


BUILDERS: dict[str, Callable[[Any], tuple[quax.ArrayValue, jax.Array]]] = {}


def builder(fn):
    BUILDERS[fn.__name__.removeprefix("make_")] = fn
    return fn


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
