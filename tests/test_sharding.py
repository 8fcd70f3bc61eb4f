"""Values under `jax.sharding`, `shard_map` and `pmap`, on 8 CPU devices (conftest.py
sets `--xla_force_host_platform_device_count=8`), against dense arrays on one device."""

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import tree_allclose, walked
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import quax
from quax.lora import LoraArray
from quax.zero import Zero


pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)"
)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _lora(key, shape=(16, 8), rank=2, allow_materialise=False):
    k1, k2, k3 = jr.split(key, 3)
    lw = LoraArray(
        jr.normal(k1, shape), rank=rank, key=k2, allow_materialise=allow_materialise
    )
    # A nonzero `b`, so the low-rank part counts.
    return eqx.tree_at(lambda m: m.b, lw, jr.normal(k3, lw.b.shape))


def _dense(lw):
    return lw.w + lw.a @ lw.b


def test_leaf_shardings_lora(mesh):
    lw = _lora(jr.key(0))
    s = NamedSharding(mesh, P("data", "model"))
    shardings = quax.leaf_shardings(lw, s)
    assert shardings.w.spec == P("data", "model")
    assert shardings.a.spec == P("data", None)
    assert shardings.b.spec == P(None, "model")
    assert quax.leaf_shardings(jnp.ones(3), s) is s


def test_leaf_shardings_default_replicates_other_leaves(mesh):
    class Scaled(quax.ArrayValue):
        array: jax.Array
        factor: jax.Array

        def aval(self):
            return jax.core.ShapedArray(self.array.shape, self.array.dtype)

        def materialise(self):
            return self.factor * self.array

    v = Scaled(jnp.ones((8, 4)), jnp.array(2.0))
    shardings = quax.leaf_shardings(v, NamedSharding(mesh, P("data")))
    assert shardings.array.spec == P("data")
    assert shardings.factor.spec == P()


def test_device_put_value(mesh):
    lw = _lora(jr.key(1))
    s = NamedSharding(mesh, P("data", "model"))
    # Outside a trace: JAX places each leaf with its own sharding.
    placed = jax.device_put(lw, quax.leaf_shardings(lw, s))
    assert placed.w.sharding.spec == P("data", "model")
    assert placed.a.sharding.spec == P("data", None)
    assert placed.b.sharding.spec == P(None, "model")
    np.testing.assert_allclose(_dense(placed), _dense(lw), rtol=1e-6)
    # Inside a quaxified function: one `device_put` over the leaves, each with its
    # own sharding, and the value stays a value.
    fn = quax.quaxify(lambda w: jax.device_put(w, s))
    eqns = walked(jax.make_jaxpr(fn)(lw)).jaxpr.eqns
    assert [e.primitive.name for e in eqns] == ["device_put"]
    assert [d.spec for d in eqns[0].params["devices"]] == [
        P("data", "model"),
        P("data", None),
        P(None, "model"),
    ]
    out = fn(lw)
    assert isinstance(out, LoraArray)
    np.testing.assert_allclose(_dense(out), _dense(lw), rtol=1e-6)
    # Zero has no leaves: nothing to place, it stays symbolic.
    z = quax.quaxify(lambda z: jax.device_put(z, s))(Zero((8, 4), jnp.float32))
    assert isinstance(z, Zero)


@pytest.mark.parametrize("outside_jit", [False, True])
def test_sharding_constraint_value(mesh, outside_jit):
    lw = _lora(jr.key(2))
    x = jr.normal(jr.key(3), (8, 3))
    s = NamedSharding(mesh, P("data", "model"))

    def f(w, x):
        w = jax.lax.with_sharding_constraint(w, s)
        return w @ x

    fn = quax.quaxify(f)
    if outside_jit:
        fn = jax.jit(fn)
    np.testing.assert_allclose(fn(lw, x), _dense(lw) @ x, rtol=1e-5, atol=1e-5)
    # The constraint reaches every leaf: three constraints, no materialisation.
    jaxpr = walked(jax.make_jaxpr(quax.quaxify(f))(lw, x))
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert prims.count("sharding_constraint") == 3


def test_jit_in_out_shardings(mesh):
    lw = _lora(jr.key(4))
    x = jr.normal(jr.key(5), (8, 4))
    s_w = NamedSharding(mesh, P("data", "model"))
    s_x = NamedSharding(mesh, P("model", None))
    s_out = NamedSharding(mesh, P("data", None))
    fn = jax.jit(
        quax.quaxify(lambda w, x: w @ x),
        in_shardings=(quax.leaf_shardings(lw, s_w), s_x),
        out_shardings=s_out,
    )
    compiled = fn.lower(lw, x).compile()
    (w_in, x_in), _ = compiled.input_shardings
    assert w_in.w.is_equivalent_to(s_w, 2)
    assert w_in.a.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    assert w_in.b.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
    assert x_in.is_equivalent_to(s_x, 2)
    assert compiled.output_shardings.is_equivalent_to(s_out, 2)
    out = fn(lw, x)
    assert out.sharding.is_equivalent_to(s_out, 2)
    np.testing.assert_allclose(out, _dense(lw) @ x, rtol=1e-5, atol=1e-5)


def test_shard_map_value_in(mesh):
    lw = _lora(jr.key(6))
    x = jr.normal(jr.key(7), (8,))

    def f(w, x):
        # Row-parallel matvec: each device owns rows of `w` (and of `a`).
        return jax.shard_map(
            lambda w, x: w @ x,
            mesh=mesh,
            in_specs=(P("data", None), P()),
            out_specs=P("data"),
        )(w, x)

    out = quax.quaxify(f)(lw, x)  # LoRA refuses to materialise: never densified
    np.testing.assert_allclose(out, _dense(lw) @ x, rtol=1e-5, atol=1e-5)
    out_jit = jax.jit(quax.quaxify(f))(lw, x)
    np.testing.assert_allclose(out_jit, out, rtol=1e-6)


def test_shard_map_collectives_and_grad(mesh):
    lw = _lora(jr.key(8))
    x = jr.normal(jr.key(9), (16,))

    def f(w, x):
        # Column-parallel: each device holds a block of rows of `w` and the matching
        # slice of `x`; a psum over "data" adds the partial products.
        def local(w, x):
            return jax.lax.psum(x @ w, "data")

        return jax.shard_map(
            local, mesh=mesh, in_specs=(P("data", None), P("data")), out_specs=P()
        )(w, x)

    out = quax.quaxify(f)(lw, x)
    np.testing.assert_allclose(out, x @ _dense(lw), rtol=1e-5, atol=1e-5)

    def loss(lw, x):
        return jnp.sum(quax.quaxify(f)(lw, x) ** 2)

    def dense_loss(a, b, x):
        return jnp.sum((x @ (lw.w + a @ b)) ** 2)

    grads = jax.grad(loss)(lw, x)
    ga, gb = jax.grad(dense_loss, argnums=(0, 1))(lw.a, lw.b, x)
    np.testing.assert_allclose(grads.a, ga, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads.b, gb, rtol=1e-4, atol=1e-4)


def test_shard_map_value_out(mesh):
    lw = _lora(jr.key(10))

    def f(w):
        return jax.shard_map(
            lambda w: -w,
            mesh=mesh,
            in_specs=(P("data", "model"),),
            out_specs=P("data", "model"),
        )(w)

    out = quax.quaxify(f)(lw)
    assert isinstance(out, LoraArray)  # negation is a LoRA rule: still low rank
    assert tree_allclose(_dense(out), -_dense(lw))
    z = quax.quaxify(f)(Zero((16, 8), jnp.float32))
    assert isinstance(z, Zero)


def test_pmap_value():
    lw = _lora(jr.key(11), allow_materialise=True)
    stacked = jtu.tree_map(lambda leaf: jnp.stack([leaf] * 8), lw)
    x = jr.normal(jr.key(12), (8,))
    out = quax.quaxify(jax.pmap(lambda w, x: w @ x, in_axes=(0, None)))(stacked, x)
    expected = jnp.stack([_dense(lw) @ x] * 8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_leaf_specs_is_a_clear_error(mesh):
    class Bad(quax.ArrayValue):
        array: jax.Array

        def aval(self):
            return jax.core.ShapedArray(self.array.shape, self.array.dtype)

        def materialise(self):
            return self.array

        def leaf_specs(self, spec):
            return [spec, spec]

    with pytest.raises(quax.HandlerResultError, match=r"Bad.leaf_specs\(\)"):
        quax.leaf_shardings(Bad(jnp.ones(8)), NamedSharding(mesh, P("data")))


def test_literals_in_shard_map_bodies(mesh):
    # `x * 2.0` in a `shard_map` body makes `pvary 2.0`, and `psum(1, "data")` the
    # axis size: neither may be computed outside the body while tracing.
    z = Zero((16,), jnp.float32)

    def f(x):
        def body(x):
            return x * 2.0 + jax.lax.psum(1, "data")

        return jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(
            x
        )

    np.testing.assert_allclose(quax.quaxify(f)(z), f(jnp.zeros(16)))


@pytest.mark.slow
def test_sharded_lora_demo():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
    try:
        import lora_sharded  # pyright: ignore[reportMissingImports]
    finally:
        sys.path.pop(0)
    r = lora_sharded.main(width=32, depth=1, heads=2, batch=16, steps=2, quiet=True)
    np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=1e-5)
    np.testing.assert_allclose(r["losses_shard_map"], r["losses_1"], rtol=1e-5)
    assert r["mem_8"] < r["mem_1"]
