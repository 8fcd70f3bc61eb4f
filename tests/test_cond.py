"""`lax.cond` / `lax.switch` with values among the branch operands (issue 3)."""

import equinox as eqx
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
    jaxpr = walked(jax.make_jaxpr(fn)(True, value))
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


# -- one kind for both branches: `ArrayValue.join` (issue 12.2) -------------------------


def _lora(getkey, allow_materialise: bool = False):
    """A default (frozen, refusing) 4x4 LoRA weight with a non-zero update."""
    w = jax.random.normal(getkey(), (4, 4))
    lora = quax.lora.LoraArray(
        w, rank=2, key=getkey(), allow_materialise=allow_materialise
    )
    return eqx.tree_at(lambda x: x.b, lora, jax.random.normal(getkey(), lora.b.shape))


def _pick(p, w, d, x):
    """A LoRA weight in one branch and a plain (differentiated) array in the other,
    used only in a matrix product."""
    return jax.lax.cond(p, lambda w, d: w, lambda w, d: d, w, d) @ x


@pytest.mark.parametrize("p", [True, False])
def test_lora_and_dense_branches_join_without_materialising(p, getkey):
    lora = _lora(getkey)  # refuses to materialise: the join must keep it symbolic
    d, x = jax.random.normal(getkey(), (4, 4)), jax.random.normal(getkey(), (4,))
    p = jnp.asarray(p)

    def loss(lora, d, x):
        return jnp.sum(jnp.sin(quax.quaxify(_pick)(p, lora, d, x)))

    def dense_loss(lora, d, x):
        return jnp.sum(jnp.sin(_pick(p, quax.lora.merge(lora), d, x)))

    assert jnp.allclose(loss(lora, d, x), dense_loss(lora, d, x), atol=1e-5)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(lora, d, x)
    expected = jax.grad(dense_loss, argnums=(0, 1, 2))(lora, d, x)
    # The dense branch's array keeps its gradient (a joined LoRA is not frozen), and
    # the frozen weight still gets none.
    (g_lora, g_d, g_x), (e_lora, e_d, e_x) = grads, expected
    assert tree_allclose((g_lora.a, g_lora.b, g_d, g_x), (e_lora.a, e_lora.b, e_d, e_x))
    assert not jnp.any(g_lora.w)
    assert bool(jnp.any(g_d != 0)) is not bool(p)


def test_joined_output_is_a_lora_weight(getkey):
    lora = _lora(getkey)
    fn = lambda p, w, d: jax.lax.cond(p, lambda w, d: w, lambda w, d: d, w, d)
    d = jnp.ones((4, 4))
    for p in (True, False):
        out = quax.quaxify(fn)(jnp.asarray(p), lora, d)
        assert isinstance(out, quax.lora.LoraArray) and not out.frozen
        expected = quax.lora.merge(lora) if p else d
        assert jnp.allclose(quax.lora.merge(out), expected, atol=1e-6)


def test_frozen_and_unfrozen_lora_join(getkey):
    # `2.0 * w` is an unfrozen LoRA weight; `w` is frozen: both become unfrozen.
    lora, x = _lora(getkey), jnp.arange(4.0)
    fn = lambda p, w, x: jax.lax.cond(p, lambda w: w, lambda w: 2.0 * w, w) @ x
    for p in (True, False):
        got = quax.quaxify(fn)(jnp.asarray(p), lora, x)
        assert jnp.allclose(got, fn(p, quax.lora.merge(lora), x), atol=1e-5)


@pytest.mark.parametrize(
    "loop", ["while", pytest.param("scan", marks=pytest.mark.slow)]
)
def test_loop_carry_that_becomes_a_lora_weight_joins(loop, getkey):
    # The carry starts as a plain array and the body makes it the LoRA weight (as
    # optimistix's solver state does): the carry is joined, never materialised.
    lora, x = _lora(getkey), jax.random.normal(getkey(), (4,))

    def fn(w, x, n):
        def body(i, carry):
            m, v = carry
            return w, m @ v + x

        init = (jnp.zeros((4, 4)), x)
        if loop == "while":
            return jax.lax.fori_loop(0, n, body, init)[1]
        return jax.lax.fori_loop(0, 3, body, init)[1]

    n = jnp.asarray(3)  # a traced bound: `while`; the scan has a static one
    got = jax.jit(quax.quaxify(fn))(lora, x, n)
    assert jnp.allclose(got, fn(quax.lora.merge(lora), x, n), atol=1e-4)
    # Reverse mode runs through the scan (a static bound).
    g = jax.grad(lambda w: jnp.sum(quax.quaxify(fn)(w, x, 3)))(lora)
    e = jax.grad(lambda w: jnp.sum(fn(quax.lora.merge(w), x, 3)))(lora)
    assert tree_allclose((g.a, g.b), (e.a, e.b), atol=1e-4)


def test_classes_without_join_still_materialise(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    assert value.join(jnp.zeros(value.shape)) is None
