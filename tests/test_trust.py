"""Trust (issue 8): caches that never merge different programs, handlers that honour
every parameter, Python truthiness, and quaxify's own contract."""

import operator
import re
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import Ruleless

import quax
from quax._walker import static_key, treedef_key
from quax.zero import Zero


class Divided(quax.ArrayValue):
    """An array divided by a static Python number: the static field changes the
    program (`x / 0.0` is `+inf`, `x / -0.0` is `-inf`)."""

    x: jax.Array
    by: float = eqx.field(static=True)

    def aval(self):
        return jax.core.ShapedArray(self.x.shape, self.x.dtype)

    def materialise(self):
        return self.x / self.by


def _nan(payload: int) -> float:
    # A float64 NaN whose payload survives the cast to float32 (high mantissa bits).
    return struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000 | payload << 32))[0]


# -- 8.1: cache keys ------------------------------------------------------------------


def test_static_key_tells_apart_what_equality_merges():
    assert static_key(0.0) != static_key(-0.0)
    assert static_key(1) != static_key(1.0) != static_key(True)
    assert static_key(1) != static_key(True)
    assert static_key(_nan(1)) != static_key(_nan(2))
    assert static_key(_nan(1)) == static_key(_nan(1))  # a NaN hits the cache again
    assert static_key((0.0, 1)) != static_key((-0.0, 1))
    assert static_key(np.float32(0.0)) != static_key(np.float32(-0.0))
    assert static_key(np.float32(1)) != static_key(np.float64(1))
    a = jax.tree.structure(Divided(jnp.ones(2), 0.0))
    b = jax.tree.structure(Divided(jnp.ones(2), -0.0))
    assert a == b  # JAX's own comparison merges them...
    assert treedef_key(a) != treedef_key(b)  # ...quax's key does not


def test_trace_cache_static_float_signed_zero():
    f = quax.quaxify(lambda z, v, s: z + v / s)
    z, v = Zero((2,), jnp.float32), jnp.ones(2)
    assert (f(z, v, 0.0) == jnp.inf).all()
    assert (f(z, v, -0.0) == -jnp.inf).all()
    assert (f(z, v, 0.0) == jnp.inf).all()


def test_trace_cache_python_scalar_type():
    f = quax.quaxify(lambda z, s: z + s * jnp.ones((), jnp.int32))
    z = Zero((2,), jnp.int32)
    for s in (1, True, 1.0, 1, True):
        expected = s * jnp.ones((), jnp.int32) + jnp.zeros(2, jnp.int32)
        out = f(z, s)
        assert out.dtype == expected.dtype
        assert (out == expected).all()


def test_trace_cache_weak_type():
    f = quax.quaxify(lambda z, s: z + s)
    z = Zero((2,), jnp.bfloat16)
    weak, strong = jnp.asarray(1.0), jnp.float32(1.0)
    assert jax.typeof(weak).weak_type and not jax.typeof(strong).weak_type
    assert f(z, weak).dtype == jnp.bfloat16
    assert f(z, strong).dtype == jnp.float32
    assert f(z, weak).dtype == jnp.bfloat16


def test_trace_cache_static_field_of_value():
    f = quax.quaxify(lambda d: d * 1.0)
    x = jnp.ones(2)
    assert (f(Divided(x, 0.0)) == jnp.inf).all()
    assert (f(Divided(x, -0.0)) == -jnp.inf).all()


def test_trace_cache_nan_payload_hits_and_differs():
    f = quax.quaxify(lambda z, s: jax.lax.bitcast_convert_type(z + s, jnp.uint32))
    z = Zero((), jnp.float32)
    n1, n2 = _nan(1), _nan(2)
    dense = lambda s: jax.lax.bitcast_convert_type(jnp.float32(0) + s, jnp.uint32)
    assert f(z, n1) == dense(n1)
    assert f(z, n2) == dense(n2)
    assert dense(n1) != dense(n2)


def test_trace_cache_config():
    # A configuration change (here: rank promotion) is part of the key, as for jit.
    f = quax.quaxify(lambda z, v: z + v)
    z, v = Zero((2, 3), jnp.float32), jnp.ones(3)
    with jax.numpy_rank_promotion("allow"):
        assert f(z, v).shape == (2, 3)
    with pytest.raises(ValueError, match="jax_numpy_rank_promotion"):
        f(z, v)  # not served from the cache of the call that allowed it


@jax.jit
def _inner(x, s):
    return (x + 1.0) / s


def test_jit_walk_cache_folded_literals():
    z = Zero((2,), jnp.float32)
    f = quax.quaxify(lambda z: (_inner(z, 0.0), _inner(z, -0.0), _inner(z, 0.0)))
    pos, neg, pos2 = f(z)
    assert (
        (pos == jnp.inf).all() and (neg == -jnp.inf).all() and (pos2 == jnp.inf).all()
    )
    g = quax.quaxify(lambda z, s: _inner(z, s))
    assert (g(z, -0.0) == -jnp.inf).all()
    assert (g(z, 0.0) == jnp.inf).all()


def test_jit_walk_cache_literal_type():
    @jax.jit
    def inner(x, s):
        return (
            x + jnp.asarray(s).astype(jnp.float32) * 0 + jnp.asarray(s).dtype.itemsize
        )

    z = Zero((2,), jnp.float32)
    f = quax.quaxify(lambda z: (inner(z, 1), inner(z, True), inner(z, 1.0)))
    expected = (
        inner(jnp.zeros(2), 1),
        inner(jnp.zeros(2), True),
        inner(jnp.zeros(2), 1.0),
    )
    for a, b in zip(f(z), expected, strict=True):
        assert a.dtype == b.dtype and (a == b).all()


def test_jit_walk_cache_static_field_of_value():
    inner = jax.jit(lambda d: d * 1.0)
    f = quax.quaxify(inner)
    x = jnp.ones(2)
    assert (quax.quaxify(lambda d: inner(d))(Divided(x, 0.0)) == jnp.inf).all()
    assert (quax.quaxify(lambda d: inner(d))(Divided(x, -0.0)) == -jnp.inf).all()
    assert (f(Divided(x, -0.0)) == -jnp.inf).all()


def test_remat_cache_static_field_of_value():
    inner = jax.checkpoint(lambda d: d * 1.0)
    f = quax.quaxify(lambda d: inner(d))
    x = jnp.ones(2)
    assert (f(Divided(x, 0.0)) == jnp.inf).all()
    assert (f(Divided(x, -0.0)) == -jnp.inf).all()


# -- 8.3: conversion to Python scalars ---------------------------------------------------


@pytest.mark.parametrize("convert", [bool, int, float, complex, operator.index])
@pytest.mark.parametrize(
    "shape,dtype",
    [((), jnp.float32), ((), jnp.int32), ((1, 1), jnp.int32), ((2,), jnp.float32)]
    + [((0,), jnp.float32)],
)
def test_python_scalar_conversion_as_jax(convert, shape, dtype):
    for fill in (0, 3):
        dense = jnp.full(shape, fill, dtype)
        value = Ruleless(dense)
        try:
            expected = convert(dense)
        except Exception as err:  # noqa: BLE001 -- the same error, whatever it is
            with pytest.raises(type(err), match=re.escape(str(err).split("\n")[0])):
                convert(value)
        else:
            got = convert(value)
            assert type(got) is type(expected) and got == expected


def test_bool_of_zero_and_traced_value():
    assert not bool(Zero((), jnp.float32))
    assert not Zero((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="ambiguous"):
        bool(Zero((3,), jnp.float32))
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jax.jit(lambda x: bool(Ruleless(x)))(jnp.ones(()))
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(lambda x: int(Ruleless(x)))(jnp.ones((), jnp.int32))
