"""`jax.checkpoint` (remat2), call primitives, `named_scope`, `checkpoint_name`,
`stop_gradient`, `optimization_barrier` and primitives with jaxpr params that have no
handler (issue 3)."""

import jax
import jax.core
import jax.extend.core as jexc
import jax.numpy as jnp
import pytest
from builders import BUILDERS, Opaque, Pair, Ruleless, Scaled
from helpers import assert_matches_dense, densify, tree_allclose, walked
from jax.ad_checkpoint import checkpoint_name

import quax


def _eqns(jaxpr, name):
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == name]


def _block(x, y):
    return jnp.sin(x * 2.0) * y


@pytest.mark.parametrize(
    "kind, mode",
    [
        ("ruleless", "eager"),
        ("scaled", "eager"),
        ("nested", "eager"),
        ("scaled", "grad"),
    ],
)
def test_checkpoint_matches_dense(kind, mode, getkey):
    # More transformations of checkpoint: tests/test_composition.py.
    value, _ = BUILDERS[kind](getkey())
    fn = lambda x, y: jax.checkpoint(_block)(x, y)
    assert_matches_dense(fn, value, jnp.ones(value.shape), mode=mode)


def test_checkpoint_keeps_values_and_params(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    policy = jax.checkpoint_policies.nothing_saveable
    fn = lambda x: jax.checkpoint(
        lambda x: -(x * 2.0), policy=policy, prevent_cse=False
    )(x)
    out = quax.quaxify(fn)(value)
    assert isinstance(out, Scaled)  # handlers ran inside the checkpointed body
    assert tree_allclose(out, fn(densify(value)))
    (eqn,) = _eqns(walked(jax.make_jaxpr(quax.quaxify(fn))(value)), "remat2")
    assert eqn.params["policy"] is policy
    assert eqn.params["prevent_cse"] is False
    assert eqn.params["differentiated"] is False


def test_checkpoint_grad_inside_keeps_differentiated(getkey):
    value, _ = BUILDERS["ruleless"](getkey())

    def fn(w, x):
        return jax.grad(lambda x: jnp.sum(jax.checkpoint(_block)(x, w)))(x)

    x = jnp.ones(value.shape)
    assert tree_allclose(quax.quaxify(fn)(value, x), fn(densify(value), x))
    inner = jax.make_jaxpr(fn)(densify(value), x)
    assert any(e.params["differentiated"] for e in _eqns(inner, "remat2"))
    outer = walked(jax.make_jaxpr(quax.quaxify(fn))(value, x))
    assert [e.params["differentiated"] for e in _eqns(outer, "remat2")] == [
        e.params["differentiated"] for e in _eqns(inner, "remat2")
    ]


def test_named_scope_is_not_a_primitive_and_name_is_kept(getkey):
    value, _ = BUILDERS["scaled"](getkey())

    def fn(x, y):
        with jax.named_scope("block"):
            return jnp.sin(x) + y

    plain = jax.make_jaxpr(fn)(densify(value), jnp.ones(value.shape))
    assert {e.primitive.name for e in plain.jaxpr.eqns} == {"sin", "add"}
    jaxpr = walked(jax.make_jaxpr(quax.quaxify(fn))(value, jnp.ones(value.shape)))
    sin = _eqns(jaxpr, "sin")[0]
    assert str(sin.source_info.name_stack) == "block"


def test_named_call(getkey):
    value, _ = BUILDERS["nested"](getkey())
    fn = jax.named_call(lambda x: jnp.cos(x) * 2.0, name="layer")
    assert_matches_dense(fn, value)


def _closed_call(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    params = jexc.primitives.closed_call_p.get_bind_params({"call_jaxpr": closed})
    return jexc.primitives.closed_call_p.bind(*args, **params)


def test_closed_call_is_walked(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    fn = lambda x: _closed_call(lambda x: [x * 3.0, jnp.exp(x)], x)
    assert any(
        e.primitive.name == "closed_call"
        for e in jax.make_jaxpr(fn)(densify(value)).jaxpr.eqns
    )
    out = quax.quaxify(fn)(value)
    assert isinstance(out[0], Scaled)
    assert tree_allclose(out, fn(densify(value)))


def test_checkpoint_name_keeps_value(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    fn = lambda x: checkpoint_name(x, "w")
    out = quax.quaxify(fn)(value)
    assert isinstance(out, Scaled)
    assert tree_allclose(out, densify(value))


def test_stop_gradient_is_a_primitive_and_keeps_value(getkey):
    value, _ = BUILDERS["nested"](getkey())
    fn = jax.lax.stop_gradient
    names = [e.primitive.name for e in jax.make_jaxpr(fn)(densify(value)).jaxpr.eqns]
    assert names == ["stop_gradient"]
    out = quax.quaxify(fn)(value)
    assert isinstance(out, Pair)
    assert tree_allclose(out, densify(value))


def test_stop_gradient_blocks_gradients_of_leaves():
    def loss(a, quaxed):
        x = Scaled(a, jnp.asarray(2.0))
        fn = lambda x: jnp.sum(jax.lax.stop_gradient(x) * x)
        return quax.quaxify(fn)(x) if quaxed else fn(densify(x))

    a = jnp.arange(3.0)
    assert tree_allclose(jax.grad(loss)(a, True), jax.grad(loss)(a, False))


def test_optimization_barrier_keeps_values(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    fn = lambda x, y: jax.lax.optimization_barrier((x, y))
    out = quax.quaxify(fn)(value, 1.0)
    assert isinstance(out[0], Scaled)
    assert tree_allclose(out, fn(densify(value), 1.0))
    assert_matches_dense(fn, value, jnp.ones(value.shape), mode="grad")


def test_custom_linear_solve_materialises(getkey):
    matrix = Ruleless(jnp.array([[2.0, 0.5], [0.5, 3.0]]))

    def fn(m, b):
        matvec = lambda x: m @ x
        solve = lambda _, b: jnp.linalg.solve(m, b)
        return jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True)

    b = jnp.array([1.0, 2.0])
    jaxpr = jax.make_jaxpr(fn)(densify(matrix), b)
    assert _eqns(jaxpr, "custom_linear_solve")
    assert_matches_dense(fn, matrix, b)
    assert_matches_dense(fn, matrix, b, mode="grad")


def test_reduce_with_jaxpr_param_is_first_order():
    # `reduce` carries its combiner as a jaxpr, which must not be walked.
    x = Ruleless(jnp.arange(6.0).reshape(2, 3))
    fn = lambda x: jax.lax.reduce(x, 1.0, lambda a, b: a * b + 0.0 * a, (1,))
    jaxpr = jax.make_jaxpr(fn)(densify(x))
    assert _eqns(jaxpr, "reduce")
    assert_matches_dense(fn, x)


def test_no_handler_error_names_the_primitive():
    def fn(m, b):
        return jax.lax.custom_linear_solve(lambda x: m @ x, b, lambda _, b: b)

    with pytest.raises(quax.NoHandlerError, match="custom_linear_solve"):
        quax.quaxify(fn)(Opaque(jnp.eye(2)), jnp.ones(2))


def test_shard_map_one_device(getkey):
    from jax.sharding import AxisType, PartitionSpec

    mesh = jax.make_mesh((1,), ("i",), axis_types=(AxisType.Auto,))
    spec = PartitionSpec("i")
    fn = jax.shard_map(
        lambda x: x * 2.0 + 1.0, mesh=mesh, in_specs=spec, out_specs=spec
    )
    value = Scaled(jnp.arange(4.0), jnp.asarray(3.0))
    assert tree_allclose(quax.quaxify(fn)(value), fn(densify(value)))
