"""`lax.while_loop` / `fori_loop` with values as constants and carries (issue 3)."""

import jax
import jax.numpy as jnp
import pytest
from builders import (
    BUILDERS,
    LOWRANK_MATERIALISED,
    Opaque,
    Pair,
    Ruleless,
    Scaled,
    StaticZero,
    make_lowrank,
)
from helpers import assert_matches_dense, densify, tree_allclose

import quax


def _count_loop(n, body, init):
    return jax.lax.while_loop(
        lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[1])), (jnp.asarray(0), init)
    )


def test_carry_of_same_type_stays_value(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    fn = lambda x: _count_loop(3, lambda c: c * 2.0, x)
    out = quax.quaxify(fn)(value)
    assert isinstance(out[1], Scaled)  # Scaled.mul keeps the type every iteration
    assert tree_allclose(out, fn(densify(value)))


@pytest.mark.parametrize("kind", ("ruleless", "scaled", "nested"))
def test_carry_that_changes_type_is_materialised(kind, getkey):
    value, _ = BUILDERS[kind](getkey())
    fn = lambda x: _count_loop(3, lambda c: jnp.sin(c) + 1.0, x)
    out = quax.quaxify(fn)(value)
    assert not isinstance(out[1], quax.Value)
    assert tree_allclose(out, fn(densify(value)))


def test_static_metadata_change_is_materialised():
    # StaticZero + 1 materialises: the carry changes from a value to an array.
    zero = StaticZero((3,), jnp.float32)
    fn = lambda x: _count_loop(4, lambda c: c + 1.0, x)
    out = quax.quaxify(fn)(zero)
    assert tree_allclose(out, fn(densify(zero)))


def test_only_the_changing_carry_is_materialised(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    other = Ruleless(jnp.arange(3.0))

    def fn(a, b):
        def body(c):
            i, a, b = c
            return i + 1, -a, b * 2.0 + 1.0

        return jax.lax.while_loop(lambda c: c[0] < 5, body, (0, a, b))

    out = quax.quaxify(fn)(value, other)
    assert isinstance(out[1], Scaled)
    assert not isinstance(out[2], quax.Value)
    assert tree_allclose(out, fn(densify(value), densify(other)))


def test_value_as_loop_constant(getkey):
    value, dense = make_lowrank(getkey())
    x = jnp.ones((2, 3))
    fn = lambda w, x: _count_loop(3, lambda c: jnp.tanh(c @ w) @ w.T, x)
    LOWRANK_MATERIALISED.clear()
    out = quax.quaxify(fn)(value, x)
    assert tree_allclose(out, fn(dense, x), rtol=1e-4, atol=1e-4)


def test_value_as_condition_constant(getkey):
    limit = Ruleless(jnp.asarray(4.0))
    fn = lambda lim, x: jax.lax.while_loop(
        lambda c: jnp.sum(c) < lim, lambda c: c + 1.0, x
    )
    out = quax.quaxify(fn)(limit, jnp.zeros(2))
    assert tree_allclose(out, fn(densify(limit), jnp.zeros(2)))


@pytest.mark.parametrize("mode", ("eager", "vmap"))
def test_fori_loop_dynamic_bounds(mode, getkey):
    value, _ = BUILDERS["nested"](getkey())
    fn = lambda n, x: jax.lax.fori_loop(0, n, lambda i, c: c * 0.5 + i, x)
    assert_matches_dense(fn, jnp.asarray(3), value, mode=mode)


def test_jvp_through_while(getkey):
    a = jnp.arange(3.0)
    fn = lambda x: _count_loop(3, lambda c: jnp.sin(c) * 2.0, x)[1]

    def quaxed(a):
        return quax.quaxify(fn)(Scaled(a, jnp.asarray(3.0)))

    got = jax.jvp(quaxed, (a,), (jnp.ones(3),))
    expected = jax.jvp(lambda a: fn(3.0 * a), (a,), (jnp.ones(3),))
    assert tree_allclose(got, expected)


def test_nested_value_carry_kept():
    pair = Pair(Scaled(jnp.ones(3), jnp.asarray(2.0)), Ruleless(jnp.arange(3.0)))
    fn = lambda x: _count_loop(2, lambda c: c, x)
    out = quax.quaxify(fn)(pair)
    assert isinstance(out[1], Pair)
    assert tree_allclose(out, fn(densify(pair)))


# -- a predicate computed from a value (issue 13.6) --


def test_value_predicate_keeps_the_carry(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    # `jnp.sum(c)` materialises (Scaled has no `reduce_sum`), the carry does not.
    fn = lambda x: jax.lax.while_loop(
        lambda c: jnp.sum(c) < 100.0, lambda c: c * 2.0, x
    )
    out = quax.quaxify(fn)(Scaled(jnp.ones(3), jnp.asarray(1.0)))
    assert isinstance(out, Scaled)
    assert tree_allclose(out, fn(jnp.ones(3)))


@pytest.mark.parametrize("op", [jnp.gcd, jnp.lcm])
def test_gcd_lcm_of_values(op):
    from quax.zero import Zero

    a = jnp.array([4, 6, 9], jnp.int32)
    b = jnp.array([6, 4, 12], jnp.int32)
    got = quax.quaxify(op)(Ruleless(a), b)
    assert tree_allclose(got, op(a, b))
    got = quax.quaxify(op)(Zero((3,), jnp.int32), b)
    assert tree_allclose(got, op(jnp.zeros(3, jnp.int32), b))


# -- vmap of a loop whose predicate is batched (issue 8.5) --


def _until(n, w):
    return jax.lax.while_loop(
        lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 2.0), (0, w)
    )


def test_vmap_outside_with_batched_predicate(getkey):
    value = Scaled(jnp.ones(3), jnp.asarray(1.5))
    ns = jnp.array([1, 3])
    got = jax.vmap(lambda n, w: densify(quax.quaxify(_until)(n, w)), (0, None))(
        ns, value
    )
    expected = jax.vmap(_until, (0, None))(ns, densify(value))
    assert tree_allclose(got, expected)


@pytest.mark.parametrize("kind", ["zero", "lowrank"])
def test_vmap_inside_with_batched_predicate(kind, getkey):
    from quax.zero import Zero

    ns = jnp.array([1, 3])
    if kind == "zero":
        # A Zero carry reaches the batched loop (its broadcast stays a Zero).
        fn = jax.vmap(_until, (0, None))
        args = (ns, Zero((3,), jnp.float32))
    else:
        # A LowRank weight is a body constant of the batched loop.
        w, _ = make_lowrank(getkey(), shape=(3, 3))

        def one(n, w, x):
            return jax.lax.while_loop(
                lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x)
            )

        fn = jax.vmap(one, (0, None, None))
        args = (ns, w, jnp.ones(3))
    for call in (quax.quaxify(fn), jax.jit(quax.quaxify(fn))):
        assert tree_allclose(call(*args), fn(*densify(args)), rtol=1e-4, atol=1e-4)


# -- a value that refuses to materialise: an error naming the line (issue 8.4) --


def _assert_names(err, prim, cls):
    msg = str(err)
    assert f"`{prim}`" in msg and cls in msg and "test_while.py" in msg, msg


def test_refusal_of_a_value_predicate():
    flag = Opaque(jnp.asarray(True))
    fn = lambda f: jax.lax.while_loop(
        lambda c: c[1], lambda c: (c[0] + 1, c[1]), (0, f)
    )
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(flag)
    _assert_names(info.value, "while", "Opaque")


def test_refusal_of_a_carry_that_changes_kind():
    fn = lambda x: _count_loop(2, lambda c: jnp.zeros(3), x)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(Opaque(jnp.ones(3)))
    _assert_names(info.value, "while", "Opaque")
