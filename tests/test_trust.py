"""Trust (issue 8): caches that never merge different programs, handlers that honour
every parameter, Python truthiness, and quaxify's own contract."""

import functools
import operator
import re
import struct

import equinox as eqx
import jax
import jax.core
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


# -- 13.7 and 8.7: quaxify's contract: wrapping, caching --------------------------------


def _documented(a, b):
    """Adds."""
    return a + b


def test_quaxify_keeps_function_metadata():
    f = quax.quaxify(_documented)
    assert f.__name__ == "_documented"
    assert f.__qualname__ == "_documented"
    assert f.__doc__ == "Adds."
    assert f.__module__ == __name__
    assert f.__wrapped__ is _documented  # pyright: ignore[reportFunctionMemberAccess]
    p = quax.quaxify(functools.partial(_documented, 1))
    assert p.__wrapped__.func is _documented  # pyright: ignore[reportFunctionMemberAccess]
    assert p.__doc__ == functools.partial(_documented, 1).__doc__

    class Layer(eqx.Module):
        """A layer."""

        def __call__(self, x):
            return x

        def method(self, x):
            """A method."""
            return x

    layer = Layer()
    assert quax.quaxify(layer).__doc__ == "A layer."
    bound = quax.quaxify(layer.method)
    assert bound.__name__ == "method" and bound.__doc__ == "A method."
    assert bound(Zero((2,), jnp.float32)) == Zero((2,), jnp.float32)


_GLOBAL = {"scale": 1.0}


def _reads_global(x):
    return x * _GLOBAL["scale"]


def test_cache_false_rereads_globals():
    x = Ruleless(jnp.ones(2))
    cached = quax.quaxify(_reads_global)
    fresh = quax.quaxify(_reads_global, cache=False)
    _GLOBAL["scale"] = 1.0
    assert (cached(x) == 1).all() and (fresh(x) == 1).all()
    _GLOBAL["scale"] = 3.0
    # The documented contract (as `jax.jit`): a cached trace keeps what it read...
    assert (cached(x) == 1).all()
    # ...and `cache=False` traces again on every call.
    assert (fresh(x) == 3).all()
    _GLOBAL["scale"] = 1.0


# -- strict mode --------------------------------------------------------------------------


def _densifies(z, r, x):
    y = jnp.sin(z) * x
    return jax.jit(lambda a, b: a + jnp.sum(b))(y, r)  # `reduce_sum` of a Ruleless


def _args():
    return Zero((3,), jnp.float32), Ruleless(jnp.arange(3.0)), jnp.ones(3)


def test_strict_error_names_primitive_type_and_line():
    f = quax.quaxify(_densifies, materialise="error")
    with pytest.raises(quax.MaterialiseError, match="reduce_sum") as info:
        f(*_args())
    assert "Ruleless" in str(info.value) and "test_trust.py" in str(info.value)
    assert isinstance(info.value, quax.QuaxError)


def test_strict_mode_is_part_of_every_cache_key():
    allow = quax.quaxify(_densifies)
    error = quax.quaxify(_densifies, materialise="error")
    expected = jnp.ones(3) * 0 + 3.0
    assert (allow(*_args()) == expected).all()  # caches the trace and the jit body
    with pytest.raises(quax.MaterialiseError):
        error(*_args())
    with pytest.raises(quax.MaterialiseError), quax.strict():
        allow(*_args())
    assert (allow(*_args()) == expected).all()  # and back: the "allow" entries serve
    with quax.strict():
        assert (quax.quaxify(_densifies, materialise="allow")(*_args()) == 3).all()


def test_strict_warn_and_clean_program():
    with pytest.warns(quax.MaterialiseWarning, match="reduce_sum"):
        out = quax.quaxify(_densifies, materialise="warn")(*_args())
    assert (out == 3).all()
    with quax.strict():  # nothing materialises: no error
        out = quax.quaxify(lambda z, x: jax.jit(jnp.sin)(z) * x)(
            Zero((3,), jnp.float32), jnp.ones(3)
        )
    assert isinstance(out, Zero)
    with pytest.raises(ValueError, match="one of"):
        quax.quaxify(_densifies, materialise="never")  # pyright: ignore[reportArgumentType]


def test_strict_inside_control_flow():
    def f(r, x):
        return jax.lax.scan(lambda c, _: (c + r, None), x, length=2)[0]

    with pytest.raises(quax.MaterialiseError, match="Ruleless"), quax.strict():
        quax.quaxify(f)(Ruleless(jnp.ones(3)), jnp.ones(3))


# -- caches under threads ---------------------------------------------------------------


def test_caches_under_eight_threads():
    from concurrent.futures import ThreadPoolExecutor

    def fn(z, r, x, s):
        y = jax.jit(lambda a: jnp.cos(a) * s)(r + z)
        return jax.checkpoint(lambda a: a * 2.0)(y) + x

    quaxed = quax.quaxify(fn)
    dense = jax.jit(fn, static_argnums=3)

    def job(i):
        n = 1 + i % 2
        s = (0.5, -0.0)[i // 2 % 2]
        r = jnp.arange(n, dtype=jnp.float32) + i
        args = (Zero((n,), jnp.float32), Ruleless(r), jnp.ones(n))
        got = quaxed(*args, s)
        want = dense(jnp.zeros(n), r, jnp.ones(n), s)
        return bool((got == want).all()) and got.shape == want.shape

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(job, range(16)))
    from quax._quaxify import TRACES
    from quax.handlers._jit import JIT_TRACES

    for cache in (TRACES, JIT_TRACES):
        for closed, _ in cache._entries.values():
            assert not any(isinstance(c, jax.core.Tracer) for c in closed.consts)
    assert len(TRACES) <= TRACES.maxsize


def test_trace_cache_is_bounded_lru():
    from quax._walker import TraceCache

    cache = TraceCache(maxsize=2)
    closed = jax.make_jaxpr(jnp.sin)(1.0)
    for k in "abc":
        assert cache.put(k, closed, None)
        cache.get("a")  # "a" stays the most recently used
    assert len(cache) == 2 and cache.get("a") is not None and cache.get("b") is None


class _BadAval(quax.ArrayValue):
    array: jax.Array

    def aval(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return self.array.shape  # a shape, not an abstract value

    def materialise(self):
        return self.array


@pytest.mark.parametrize("where", ("call", "jit"))
def test_aval_returning_a_non_aval_is_a_quax_error(where):
    bad = _BadAval(jnp.ones((2, 3)))
    fn = quax.quaxify(lambda v: v + 1.0)
    if where == "jit":
        fn = eqx.filter_jit(fn)
    with pytest.raises(quax.HandlerResultError, match=r"_BadAval\.aval\(\) returned"):
        fn(bad)
    with pytest.raises(TypeError, match=r"ShapedArray\(shape, dtype\)"):
        fn(bad)
