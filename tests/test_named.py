"""Named axes (`quax.named.NamedArray`): by-name alignment, names carried through
shape primitives, clear errors, and dense equivalence where names agree with
positions."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import assert_matches_dense

import quax
from quax.named import AxisNameError, Broadcast, NamedArray, trace


def named(key, shape, axes):
    return NamedArray(jr.normal(key, shape), axes, allow_materialise=True)


def program(x, w, s):
    """Names agree with positions here, so dense arrays give the same numbers."""
    h = jnp.tanh(x * s + 1.0) @ w  # (a, b) @ (b, c) -> (a, c)
    h = jnp.where(h > 0, h, 0.1 * h)
    total = jnp.sum(h, axis=0)  # (c,)
    return h.T, total, jnp.cumsum(x, axis=1)[1:, ::2], x.reshape(12), jnp.max(x[0])


@pytest.mark.parametrize("mode", ["eager", "jit_outside", "grad", "vmap"])
def test_program_matches_dense(mode, getkey):
    x = named(getkey(), (3, 4), ("a", "b"))
    w = named(getkey(), (4, 2), ("b", "c"))
    assert_matches_dense(program, x, w, jnp.asarray(0.5), mode=mode)


def test_names_through_program(getkey):
    x = named(getkey(), (3, 4), ("a", "b"))
    w = named(getkey(), (4, 2), ("b", "c"))
    ht, total, cum, flat, top = quax.quaxify(program)(x, w, 0.5)
    assert ht.axes == ("c", "a")
    assert total.axes == ("c",)
    assert cum.axes == ("a", "b")
    assert flat.axes == (("a", "b"),)
    assert top.axes == ()


def test_elementwise_aligns_by_name(getkey):
    x = named(getkey(), (3, 3), ("a", "b"))
    y = named(getkey(), (3, 3), ("b", "a"))
    out = quax.quaxify(jnp.add)(x, y)
    assert out.axes == ("a", "b")
    np.testing.assert_allclose(out.array, x.array + y.array.T)
    # A vector named `a` broadcasts along `a`, whatever position JAX gives it.
    v = named(getkey(), (3,), ("a",))
    with jax.numpy_rank_promotion("allow"):
        out = quax.quaxify(jnp.multiply)(x, v)
    assert out.axes == ("a", "b")
    np.testing.assert_allclose(out.array, x.array * v.array[:, None], rtol=1e-6)
    # Outer sum of two broadcast vectors.
    u = named(getkey(), (3,), ("b",))
    out = quax.quaxify(lambda v, u: v[:, None] + u[None, :])(v, u)
    assert out.axes == ("a", "b")
    np.testing.assert_allclose(out.array, v.array[:, None] + u.array[None, :])
    out = quax.quaxify(lambda x, y: jnp.where(y > 0, x, y))(x, y)
    assert out.axes == ("b", "a")  # the predicate's order (the first operand)
    np.testing.assert_allclose(out.array, jnp.where(y.array > 0, x.array.T, y.array))


def test_contraction_by_name(getkey):
    x = named(getkey(), (3, 3), ("a", "b"))
    y = named(getkey(), (3, 3), ("b", "a"))
    # einsum pairs a-b and b-a positionally; names pair a-a and b-b.
    out = quax.quaxify(lambda x, y: jnp.einsum("ij,ij->", x, y))(x, y)
    np.testing.assert_allclose(out.array, jnp.sum(x.array * y.array.T), rtol=1e-5)
    z = named(getkey(), (3, 5), ("b", "c"))
    out = quax.quaxify(jnp.matmul)(x, z)
    assert out.axes == ("a", "c")
    np.testing.assert_allclose(out.array, x.array @ z.array, rtol=1e-5)
    bx = named(getkey(), (2, 3, 4), ("batch", "a", "b"))
    bz = named(getkey(), (2, 4, 5), ("batch", "b", "c"))
    out = quax.quaxify(jnp.matmul)(bx, bz)
    assert out.axes == ("batch", "a", "c")
    np.testing.assert_allclose(out.array, bx.array @ bz.array, rtol=1e-5)
    t = trace(named(getkey(), (3, 2, 3), ("a", "b", "c")), axis1="a", axis2="c")
    assert t.axes == ("b",)


def test_plain_arrays():
    x = NamedArray(jnp.ones((2, 3)), ("a", "b"))
    out = quax.quaxify(lambda x: 2.0 * x + jnp.arange(3.0)[None])(x)
    assert out.axes == ("a", "b")
    # Plain data along a broadcast axis: the axis keeps no name, and never moves.
    v = NamedArray(jnp.arange(3.0), ("b",))
    out = quax.quaxify(lambda v, p: v[None] + p)(v, jnp.ones((2, 3)))
    assert not isinstance(out.axes[0], str | Broadcast) and out.axes[1] == "b"


def test_errors(getkey):
    a = NamedArray(jnp.ones(3), ("a",))
    b = NamedArray(jnp.ones(3), ("b",))
    with pytest.raises(AxisNameError, match=r"axis 'b' has no place"):
        quax.quaxify(jnp.add)(a, b)
    x = NamedArray(jnp.ones((3, 3)), ("a", "b"))
    y = NamedArray(jnp.ones((3, 3)), ("b", "a"))
    with pytest.raises(AxisNameError, match="ambiguous"):
        quax.quaxify(lambda p, x, y: jnp.where(p, x, y))(jnp.ones((3, 3), bool), x, y)
    z = NamedArray(jnp.ones((3, 3)), ("c", "d"))
    with pytest.raises(AxisNameError, match="names differ"):
        quax.quaxify(jnp.matmul)(x, z)
    with pytest.raises(AxisNameError, match="neither contracted nor batched"):
        quax.quaxify(lambda x: x @ x.T)(x)
    with pytest.raises(quax.NoHandlerError, match="refusing to drop the names"):
        quax.quaxify(lambda x, i: x[i])(x, jnp.array([0, 2]))
    with pytest.raises(ValueError, match="unique"):
        NamedArray(jnp.ones((2, 2)), ("a", "a"))


def control_flow(xs, h0, w, s):
    """A named carry through scan (plain xs, named ys), cond and while."""

    def step(h, x):
        h = jnp.tanh(h @ w + x * s) * h0
        return h, 2.0 * h

    h, ys = lax.scan(step, h0, xs)
    h = lax.cond(jnp.sum(h) > 0, lambda h: h * 2.0, lambda h: -h, h)
    n = (jnp.sum(ys) > 0).astype(jnp.int32) + 1  # a traced bound: a real while
    _, g = lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 0.5), (0, h))
    return h, ys, g


@pytest.mark.parametrize("mode", ["eager", "jit_outside", "grad", "vmap"])
def test_control_flow_matches_dense(mode, getkey):
    h0 = named(getkey(), (3,), ("b",))
    xs, w = jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (3, 3))
    fn = control_flow if mode != "grad" else (lambda *a: control_flow(*a)[:2])
    assert_matches_dense(fn, xs, h0, w, jnp.asarray(0.5), mode=mode)


def test_control_flow_keeps_names(getkey):
    h0 = named(getkey(), (3,), ("b",))
    h, _, g = quax.quaxify(control_flow)(jnp.ones((4, 3)), h0, jnp.eye(3), 0.5)
    assert isinstance(h, NamedArray) and h.axes == ("b",)
    assert isinstance(g, NamedArray) and g.axes == ("b",)


def test_outer_product_of_one_name():
    v = NamedArray(jnp.arange(3.0), ("b",))
    with pytest.raises(AxisNameError, match="two positions"):
        quax.quaxify(jnp.outer)(v, v)
    w = v.enable_materialise()
    np.testing.assert_allclose(
        quax.quaxify(jnp.outer)(w, w), jnp.outer(v.array, v.array)
    )
    out = quax.quaxify(jnp.outer)(v, v.rename({"b": "c"}))
    assert out.axes == ("b", "c")
    np.testing.assert_allclose(out.array, jnp.outer(v.array, v.array))


def test_scan_xs_and_ys_keep_names(getkey):
    xs = named(getkey(), (4, 3), ("t", "b"))
    h0 = named(getkey(), (3,), ("b",))

    def fn(h0, xs):
        return lax.scan(lambda h, x: (h + x, h * x), h0, xs)

    h, ys = quax.quaxify(fn)(h0, xs)
    assert h.axes == ("b",) and ys.axes[1:] == ("b",)
    ref_h, ref_ys = fn(h0.array, xs.array)
    np.testing.assert_allclose(h.array, ref_h, rtol=1e-6)
    np.testing.assert_allclose(ys.array, ref_ys, rtol=1e-6)


def test_unnamed_axis_that_would_move_falls_back_when_materialising_is_allowed():
    """Found by the fuzzer: under `vmap`, a `switch` on a batched index gives a named
    array with a positional axis, and `jnp.var` of it then meets its own mean in
    another layout. With `allow_materialise=True` the positional result is returned
    (as dense JAX computes it); otherwise the names cannot express it: an error."""
    x = jax.random.normal(jax.random.key(0), (3, 4))
    s = jnp.array([-0.3, 1.5])

    def f(v, s):
        y = jax.lax.switch(jnp.floor(s).astype(jnp.int32), [jnp.negative, jnp.sin], v)
        return jnp.var(y, keepdims=True)

    batched = lambda v, s: jax.vmap(lambda s: f(v, s))(s)
    got = quax.quaxify(batched)(NamedArray(x, ("a", "b"), allow_materialise=True), s)
    assert jnp.allclose(got, batched(x, s), rtol=1e-6)
    with pytest.raises(AxisNameError, match="unnamed axis"):
        quax.quaxify(batched)(NamedArray(x, ("a", "b")), s)


def test_concatenate_of_different_names_is_positional_when_materialising_is_allowed():
    """Found by the fuzzer: `jnp.pad(..., mode="edge")` concatenates edge slices
    (whose first axis is a broadcast) with the array itself: JAX's positional result
    with `allow_materialise=True`, an `AxisNameError` otherwise."""
    x = jax.random.normal(jax.random.key(1), (3, 4))

    def f(v):
        return jnp.pad(v, ((2, 2), (1, 0)), mode="edge")

    got = quax.quaxify(f)(NamedArray(x, ("a", "b"), allow_materialise=True))
    got = got.materialise() if isinstance(got, NamedArray) else got
    assert jnp.array_equal(got, f(x))
    with pytest.raises(AxisNameError, match="concatenate"):
        quax.quaxify(f)(NamedArray(x, ("a", "b")))


def test_sinc_of_a_kept_dims_reduction_under_vmap_is_positional():
    """Found by the fuzzer: `jnp.sinc` (a `jnp.where` with plain constants inside a
    `custom_jvp`) of `jnp.min(v, keepdims=True)`, whose axes are only broadcast
    ones, under `vmap` of the value: which name each plain axis has is ambiguous, so
    with `allow_materialise=True` it is JAX's positional result."""
    xs = jax.random.normal(jax.random.key(2), (2, 3, 4))

    def f(v):
        return jnp.sinc(jnp.min(v, keepdims=True))

    def per_example(v):
        out = quax.quaxify(f)(v)
        return out.materialise() if isinstance(out, NamedArray) else out

    named = eqx.filter_vmap(
        lambda x: NamedArray(x, ("a", "b"), allow_materialise=True)
    )(xs)
    got = eqx.filter_vmap(per_example)(named)
    assert jnp.allclose(got, jax.vmap(f)(xs), rtol=1e-6)
