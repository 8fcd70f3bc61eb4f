"""Callbacks: values are materialised before they leave JAX (issue 3)."""

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import pytest
from builders import BUILDERS, Opaque
from helpers import densify, tree_allclose
from jax.experimental import io_callback

import quax


def _received(store):
    def callback(x):
        store.append(np.asarray(x))
        return np.asarray(x) * 2

    return callback


@pytest.mark.parametrize("jit", [False, True])
def test_pure_callback_gets_dense_array(jit, getkey):
    value, dense = BUILDERS["nested"](getkey())
    seen = []
    spec = jax.ShapeDtypeStruct(value.shape, value.dtype)
    fn = lambda x: jax.pure_callback(_received(seen), spec, x) + 1.0
    call = jax.jit(quax.quaxify(fn)) if jit else quax.quaxify(fn)
    out = call(value)
    assert len(seen) == 1 and isinstance(seen[0], np.ndarray)
    assert np.allclose(seen[0], dense)
    assert tree_allclose(out, dense * 2 + 1.0)


def test_io_callback_ordered(getkey):
    value, dense = BUILDERS["scaled"](getkey())
    seen = []
    spec = jax.ShapeDtypeStruct(value.shape, value.dtype)

    def fn(x):
        a = io_callback(_received(seen), spec, x, ordered=True)
        b = io_callback(_received(seen), spec, -x, ordered=True)
        return a + b

    out = jax.jit(quax.quaxify(fn))(value)
    assert [s.tolist() for s in seen] == [dense.tolist(), (-dense).tolist()]
    assert tree_allclose(out, jnp.zeros(value.shape))


def test_debug_print_shows_dense_values(capfd, getkey):
    value, _ = BUILDERS["ruleless"](getkey())

    def fn(x):
        jax.debug.print("v={x}", x=x)
        return x

    fn(densify(value))
    jax.effects_barrier()
    expected = capfd.readouterr().out
    out = quax.quaxify(fn)(value)
    jax.effects_barrier()
    assert capfd.readouterr().out == expected
    assert tree_allclose(out, value)


def test_debug_callback_gets_dense_array(getkey):
    value, dense = BUILDERS["scaled"](getkey())
    seen = []

    def fn(x):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), x)
        return x * 2.0

    out = jax.jit(quax.quaxify(fn))(value)
    jax.effects_barrier()
    assert len(seen) == 1 and np.allclose(seen[0], dense)
    assert tree_allclose(out, dense * 2.0)


def test_callback_of_a_value_that_refuses_to_materialise():
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    fn = lambda x: jax.pure_callback(lambda v: v, spec, x)
    with pytest.raises(quax.NoHandlerError, match="pure_callback"):
        quax.quaxify(fn)(Opaque(jnp.ones(2)))
