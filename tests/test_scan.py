"""`lax.scan` with values as constants, carries and `xs` (issue 3)."""

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import pytest
from builders import (
    BUILDERS,
    LOWRANK_MATERIALISED,
    LowRank,
    Opaque,
    Ruleless,
    Scaled,
    make_lowrank,
)
from helpers import assert_matches_dense, densify, tree_allclose, walked

import quax
from quax._errors import HandlerResultError


def _layers(ws, x):
    """A stack of layers applied by scanning over their weights."""

    def layer(h, w):
        h = jnp.tanh(h @ w)
        return h, jnp.sum(h)

    return jax.lax.scan(layer, x, ws)


def test_scan_over_layers_runs_handlers_in_body(getkey):
    ws, dense = make_lowrank(getkey(), shape=(4, 3, 3), rank=2)
    x = jnp.ones((2, 3))
    LOWRANK_MATERIALISED.clear()
    out = quax.quaxify(_layers)(ws, x)
    # `rdot_general` ran on each per-layer slice: nothing was materialised.
    assert LOWRANK_MATERIALISED == []
    assert tree_allclose(out, _layers(dense, x), rtol=1e-4, atol=1e-4)


def test_scan_over_layers_jaxpr_has_no_dense_weight(getkey):
    ws, _ = make_lowrank(getkey(), shape=(4, 3, 3), rank=2)
    LOWRANK_MATERIALISED.clear()
    walked(jax.make_jaxpr(quax.quaxify(_layers))(ws, jnp.ones((2, 3))))
    assert LOWRANK_MATERIALISED == []


def test_scan_over_layers_grad(getkey):
    ws, _ = make_lowrank(getkey(), shape=(3, 3, 3), rank=1)
    x = jnp.ones((2, 3))

    def loss(a, b, quaxed):
        w = LowRank(ws.w, a, b)
        fn = quax.quaxify(_layers) if quaxed else _layers
        carry, ys = fn(w if quaxed else densify(w), x)
        return jnp.sum(carry) + jnp.sum(ys)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(ws.a, ws.b, True)
    expected = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
        ws.a, ws.b, False
    )
    assert tree_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_value_xs_without_opt_in_is_materialised(getkey):
    xs = Ruleless(jnp.arange(12.0).reshape(4, 3))
    fn = lambda xs: jax.lax.scan(lambda c, x: (c + x, c * x), jnp.zeros(3), xs)
    out = quax.quaxify(fn)(xs)
    assert tree_allclose(out, fn(densify(xs)))


def test_opted_in_xs_missing_the_axis_is_materialised(getkey):
    # `b` is shared by every layer (no leading axis): slicing leaf by leaf is wrong.
    ws, _ = make_lowrank(getkey(), shape=(4, 3, 3), rank=2)
    shared = LowRank(ws.w, ws.a, ws.b[0])
    x = jnp.ones((2, 3))
    out = quax.quaxify(_layers)(shared, x)
    assert tree_allclose(out, _layers(densify(shared), x), rtol=1e-4, atol=1e-4)


class _BadSlices(quax.ArrayValue):
    """Opts in to leafwise scanning, but its aval does not slice with its leaves."""

    data: jax.Array
    shape_: tuple[int, ...] = eqx.field(static=True)

    def aval(self):
        return jax.core.ShapedArray(self.shape_, self.data.dtype)

    def materialise(self):
        return jnp.reshape(self.data, self.shape_)

    def scan_leafwise(self):
        return True


def test_wrong_opt_in_is_an_error_not_a_wrong_result():
    bad = _BadSlices(jnp.ones((4, 3)), (4, 3))
    fn = lambda xs: jax.lax.scan(lambda c, x: (c + x, None), jnp.zeros(3), xs)
    with pytest.raises(HandlerResultError, match="scan_leafwise"):
        quax.quaxify(fn)(bad)


def test_values_as_consts_and_carry(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    w = Ruleless(jnp.full((3, 4), 0.5))

    def fn(c0, w):
        return jax.lax.scan(
            lambda c, x: (c * 2.0, jnp.sum(c * w) + x), c0, jnp.arange(5.0)
        )

    out = quax.quaxify(fn)(value, w)
    assert isinstance(out[0], Scaled)  # the carry kept its type
    assert tree_allclose(out, fn(densify(value), densify(w)))


def test_carry_that_changes_type_is_materialised(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    fn = lambda c0: jax.lax.scan(lambda c, x: (c + x, c), c0, jnp.ones((3, 3, 4)))
    out = quax.quaxify(fn)(value)
    assert not isinstance(out[0], quax.Value)
    assert tree_allclose(out, fn(densify(value)))


def test_value_ys_are_stacked_when_opted_in(getkey):
    ws, _ = make_lowrank(getkey(), shape=(4, 3, 3), rank=2)
    fn = lambda ws: jax.lax.scan(lambda c, w: (c, w), 0.0, ws)
    out = quax.quaxify(fn)(ws)
    assert isinstance(out[1], LowRank)
    assert tree_allclose(out, fn(densify(ws)))


@pytest.mark.parametrize("reverse", [False, True])
def test_reverse_and_unroll(reverse, getkey):
    value, _ = BUILDERS["nested"](getkey())

    def fn(c0):
        return jax.lax.scan(
            lambda c, x: (c * 0.5 + x, jnp.sum(c)),
            c0,
            jnp.arange(4.0),
            reverse=reverse,
            unroll=2,
        )

    assert_matches_dense(fn, value)


@pytest.mark.parametrize("mode", ("grad", "vmap"))
def test_fori_loop_static_bounds_and_map(mode, getkey):
    value, _ = BUILDERS["scaled"](getkey())

    def fn(x, y):
        x = jax.lax.fori_loop(0, 3, lambda i, c: c * 0.5 + y, x)
        return jax.lax.map(jnp.sin, x)

    assert_matches_dense(fn, value, jnp.ones((3, 4)), mode=mode)


def test_scan_over_stacked_lora_layers(getkey):
    # LoraArray refuses to materialise by default: this only runs if the scan slices
    # the stack layer by layer and LoRA's `dot_general` runs in the body.
    from quax.lora import LoraArray

    weights = jax.random.normal(getkey(), (3, 4, 4))
    lora = LoraArray(weights, rank=2, key=getkey())
    lora = eqx.tree_at(lambda t: t.b, lora, jax.random.normal(getkey(), lora.b.shape))
    x = jnp.ones((2, 4))
    out = quax.quaxify(_layers)(lora, x)
    dense = weights + lora.a @ lora.b
    assert tree_allclose(out, _layers(dense, x), rtol=1e-4, atol=1e-4)


def test_zero_written_into_zero_stays_zero():
    """`dynamic_update_slice` of a Zero into a Zero is a Zero (issue 13.6), so a
    buffer of zeros filled with zeros in a loop stays symbolic."""
    from quax.zero import Zero

    def fill(buf, piece):
        return jax.lax.fori_loop(
            0, 3, lambda i, b: jax.lax.dynamic_update_slice(b, piece, (i, 0)), buf
        )

    out = quax.quaxify(fill)(Zero((3, 4), jnp.float32), Zero((1, 4), jnp.float32))
    assert isinstance(out, Zero) and out.shape == (3, 4)
    out = quax.quaxify(fill)(Zero((3, 4), jnp.float32), jnp.ones((1, 4)))
    assert tree_allclose(out, jnp.ones((3, 4)))


# -- a value that refuses to materialise: an error naming the line (issue 8.4) --


def _assert_names(err, prim, cls):
    msg = str(err)
    assert f"`{prim}`" in msg and cls in msg and "test_scan.py" in msg, msg


def test_refusal_as_xs():
    fn = lambda xs: jax.lax.scan(lambda c, x: (c + 1.0, None), 0.0, xs)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(Opaque(jnp.ones((4, 3))))
    _assert_names(info.value, "scan", "Opaque")


def test_refusal_as_ys():
    fn = lambda v: jax.lax.scan(lambda c, x: (c, v), 0.0, None, length=3)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(Opaque(jnp.ones(3)))
    _assert_names(info.value, "scan", "Opaque")


def test_refusal_of_a_carry_that_changes_kind():
    fn = lambda c0: jax.lax.scan(lambda c, x: (jnp.zeros(3), None), c0, None, length=2)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(Opaque(jnp.ones(3)))
    _assert_names(info.value, "scan", "Opaque")


def test_lora_refusal_as_xs(getkey):
    from quax.lora import LoraArray

    # A single 2-D LoraArray scanned over its rows has no low-rank slicing rule.
    lora = LoraArray(jnp.ones((4, 3)), rank=1, key=getkey())
    fn = lambda xs: jax.lax.scan(lambda c, x: (c + x, None), jnp.zeros(3), xs)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(fn)(lora)
    _assert_names(info.value, "scan", "LoraArray")
