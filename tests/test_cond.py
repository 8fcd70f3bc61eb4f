"""`lax.cond` / `lax.switch` with values among the branch operands (issue 3)."""

import jax
import jax.numpy as jnp
import pytest
from builders import BUILDERS, Opaque, Ruleless, Scaled, StaticZero
from helpers import assert_matches_dense, densify, tree_allclose, walked

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


# -- `lax.platform_dependent` (issue 13.6) --


def _by_platform(x):
    return jax.lax.platform_dependent(
        x, cpu=lambda x: x * 2.0, default=lambda x: x * 3.0
    )


def test_platform_dependent_keeps_values():
    value = Scaled(jnp.arange(3.0), jnp.asarray(1.5))
    for fn in (quax.quaxify(_by_platform), jax.jit(quax.quaxify(_by_platform))):
        out = fn(value)
        # Both branches return a Scaled: it stays one, and the CPU branch ran.
        assert isinstance(out, Scaled)
        assert tree_allclose(out, 2.0 * densify(value))
    # The program still chooses by platform when it is lowered.
    jaxpr = walked(jax.make_jaxpr(quax.quaxify(_by_platform))(value))
    (cond,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert cond.params["branches_platforms"] == (("cpu",), None)


def test_platform_dependent_in_jnp_diagonal_keeps_zero():
    from quax.zero import Zero

    # `jnp.diagonal` and `jnp.diag` choose their lowering by platform (JAX 0.10.2).
    z = Zero((3, 4), jnp.float32)
    assert isinstance(quax.quaxify(jnp.diagonal)(z), Zero)
    assert isinstance(quax.quaxify(jnp.diag)(Zero((3, 3), jnp.float32)), Zero)
    got = jax.jit(quax.quaxify(lambda z, x: jnp.diagonal(z) + x))(z, jnp.ones(3))
    assert tree_allclose(got, jnp.ones(3))


@pytest.mark.parametrize("mode", ("grad", "vmap"))
def test_platform_dependent_matches_dense(mode, getkey):
    value, _ = BUILDERS["nested"](getkey())
    fn = lambda y, x: jnp.diagonal(_by_platform(x * y))
    assert_matches_dense(fn, jnp.asarray(1.5), value, mode=mode)


# -- a value that refuses to materialise: an error naming the line (issue 8.4) --


def _assert_names(err, prim, cls):
    msg = str(err)
    assert f"`{prim}`" in msg and cls in msg and "test_cond.py" in msg, msg


def test_refusal_in_branches_of_different_kinds():
    fn = lambda p, a, b: jax.lax.cond(p, lambda a, b: a, lambda a, b: b, a, b)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(True, Opaque(jnp.ones(3)), jnp.zeros(3))
    _assert_names(info.value, "cond", "Opaque")


class _OpaqueIndex(Opaque):
    """Survives `switch`'s clamping of the index, so it reaches `cond` itself."""

    @staticmethod
    def default(primitive, operands, params):
        return operands[1] if primitive.name == "clamp" else NotImplemented


def test_refusal_of_a_value_index():
    fn = lambda i, x: jax.lax.switch(i, [jnp.sin, jnp.cos], x)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(_OpaqueIndex(jnp.asarray(1, jnp.int32)), jnp.ones(3))
    _assert_names(info.value, "cond", "_OpaqueIndex")
