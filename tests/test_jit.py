"""Nested `jax.jit` with values: walked once per operand types, emitted as one `jit`
equation that keeps its name (issue 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import BUILDERS, LowRank, Scaled, make_lowrank
from helpers import assert_matches_dense, densify, tree_allclose, walked

import quax
from quax.handlers._jit import JIT_TRACES


@jax.jit
def block(h, w):
    return jnp.tanh(h @ w) + h


def _model(ws, h):
    for w in ws:
        h = block(h, w)
    return h


def test_32_repeated_blocks_are_walked_once(getkey):
    w, _ = make_lowrank(getkey(), shape=(4, 4), rank=2)
    ws = [LowRank(w.w + i, w.a, w.b) for i in range(32)]
    h = jnp.ones((2, 4))
    JIT_TRACES.clear()
    out = quax.quaxify(_model)(ws, h)
    # Every call has the same inner jaxpr and operand types: one walk, 31 hits.
    assert JIT_TRACES.misses == 1
    assert JIT_TRACES.hits == 31
    assert tree_allclose(out, _model([densify(w) for w in ws], h), rtol=1e-4, atol=1e-4)


def test_jit_boundary_and_name_are_kept(getkey):
    w, _ = make_lowrank(getkey(), shape=(4, 4), rank=2)
    jaxpr = walked(jax.make_jaxpr(quax.quaxify(_model))([w, w], jnp.ones((2, 4))))
    jits = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "jit"]
    assert [e.params["name"] for e in jits] == ["block", "block"]
    # One input per leaf: h, then w, a, b of the LowRank.
    assert len(jits[0].invars) == 4
    assert len(jits[0].params["in_shardings"]) == 4
    inner = [e.primitive.name for e in jits[0].params["jaxpr"].jaxpr.eqns]
    assert "dot_general" in inner and "tanh" in inner


def test_values_come_back_from_jit(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    fn = jax.jit(lambda x: -(x * 3.0))
    out = quax.quaxify(fn)(value)
    assert isinstance(out, Scaled)
    assert tree_allclose(out, fn(densify(value)))


_GLOBAL = np.arange(12.0, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize("mode", ("eager", "jit_outside", "grad", "vmap"))
def test_jit_closing_over_a_global_constant(mode, getkey):
    value, _ = BUILDERS["nested"](getkey())
    fn = jax.jit(lambda x, y: x * jnp.asarray(_GLOBAL) + y)
    assert_matches_dense(fn, value, jnp.ones(value.shape), mode=mode)


def test_nested_jits(getkey):
    value, _ = BUILDERS["ruleless"](getkey())
    inner = jax.jit(lambda x: jnp.sin(x) * 2.0)
    outer = jax.jit(lambda x, y: inner(x) + inner(y))
    assert_matches_dense(outer, value, jnp.ones(value.shape))


def test_plain_jit_stays_unchanged(getkey):
    # No value reaches the jit: it is bound as is (the fast path).
    value, _ = BUILDERS["scaled"](getkey())
    fn = lambda x, y: x * jax.jit(jnp.sin)(y)
    JIT_TRACES.clear()
    out = quax.quaxify(fn)(value, jnp.ones(value.shape))
    assert JIT_TRACES.misses == 0
    assert tree_allclose(out, fn(densify(value), jnp.ones(value.shape)))
