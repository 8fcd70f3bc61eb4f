"""`lax.cond` / `lax.switch` with values among the branch operands (issue 3)."""

import jax
import jax.numpy as jnp
import pytest
from builders import BUILDERS, Ruleless, Scaled, StaticZero
from helpers import assert_matches_dense, densify, tree_allclose

import quax


def _two_way(p, x, y):
    return jax.lax.cond(p, lambda x, y: x * 2.0 + y, lambda x, y: jnp.sin(x) - y, x, y)


KINDS = ("ruleless", "scaled", "nested")


@pytest.mark.parametrize(
    "kind, mode",
    [(kind, "eager") for kind in KINDS] + [("nested", "grad"), ("scaled", "vmap")],
)
def test_cond_matches_dense(kind, mode, getkey):
    value, _ = BUILDERS[kind](getkey())
    y = jnp.ones(value.shape)
    assert_matches_dense(
        lambda p, x, y: _two_way(p, x, y), jnp.asarray(True), value, y, mode=mode
    )
    assert_matches_dense(lambda x, y: _two_way(False, x, y), value, y, mode=mode)


@pytest.mark.parametrize("index", [0, 1, 2, 7, -1])
def test_switch_three_branches(index, getkey):
    value, _ = BUILDERS["scaled"](getkey())
    branches = [lambda x: x * 3.0, lambda x: jnp.exp(x), lambda x: -x]
    fn = lambda i, x: jax.lax.switch(i, branches, x)
    got = quax.quaxify(fn)(jnp.asarray(index), value)
    assert tree_allclose(got, fn(jnp.asarray(index), densify(value)))


def test_same_type_outputs_stay_values(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    # Both branches return a Scaled with the same leaves: the output stays a value.
    fn = lambda p, x: jax.lax.cond(p, lambda x: x * 2.0, lambda x: -x, x)
    for p in (True, False):
        out = quax.quaxify(fn)(p, value)
        assert isinstance(out, Scaled)
        assert tree_allclose(out, fn(p, densify(value)))


def test_different_types_are_materialised(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    # One branch keeps a Scaled, the other returns a dense array.
    fn = lambda p, x: jax.lax.cond(p, lambda x: x * 2.0, lambda x: x + 1.0, x)
    for p in (True, False):
        out = quax.quaxify(fn)(p, value)
        assert not isinstance(out, quax.Value)
        assert tree_allclose(out, fn(p, densify(value)))


def test_different_value_types_are_materialised():
    z = StaticZero((3,), jnp.float32)
    r = Ruleless(jnp.arange(3.0))
    fn = lambda p, a, b: jax.lax.cond(p, lambda a, b: a, lambda a, b: b, a, b)
    for p in (True, False):
        out = quax.quaxify(fn)(p, z, r)
        assert not isinstance(out, quax.Value)
        assert tree_allclose(out, fn(p, densify(z), densify(r)))


def test_value_passed_through_unchanged_stays_value():
    r = Ruleless(jnp.arange(3.0))
    fn = lambda p, a, x: jax.lax.cond(
        p, lambda a, x: (a, x + 1), lambda a, x: (a, x), a, x
    )
    out = quax.quaxify(fn)(True, r, jnp.ones(2))
    assert isinstance(out[0], Ruleless)
    assert tree_allclose(out, fn(True, densify(r), jnp.ones(2)))


def test_value_index_is_materialised():
    index = Ruleless(jnp.asarray(1, jnp.int32))
    fn = lambda i, x: jax.lax.switch(i, [jnp.sin, jnp.cos], x)
    got = quax.quaxify(fn)(index, jnp.ones(3))
    assert tree_allclose(got, jnp.cos(jnp.ones(3)))


def test_cond_under_jit_keeps_one_cond(getkey):
    value, _ = BUILDERS["ruleless"](getkey())
    fn = quax.quaxify(lambda p, x: _two_way(p, x, 1.0))
    jaxpr = jax.make_jaxpr(fn)(True, value)
    names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert names.count("cond") == 1


def test_cond_vmapped_predicate(getkey):
    value, dense = BUILDERS["scaled"](getkey())
    preds = jnp.array([True, False])
    got = jax.vmap(quax.quaxify(lambda p, x: _two_way(p, x, 1.0)), in_axes=(0, None))(
        preds, value
    )
    expected = jax.vmap(lambda p: _two_way(p, dense, 1.0))(preds)
    assert tree_allclose(got, expected)
