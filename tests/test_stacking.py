"""The slicing and stacking hooks `ArrayValue.unstack` / `ArrayValue.stack`: values as
`lax.scan` `xs` and `ys` and `lax.map` inputs (issues 13.3 and 12.4)."""

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import pytest
from builders import LOWRANK_MATERIALISED, make_lowrank
from helpers import assert_matches_dense, densify, tree_allclose, walked

import quax
from quax._errors import HandlerResultError
from quax.lora import LoraArray
from quax.zero import Zero


#: Every `Diag.materialise()` appends the value's shape; every `Diag.mul` appends
#: the shape it ran on.
DIAG_MATERIALISED: list[tuple[int, ...]] = []
DIAG_MUL: list[tuple[int, ...]] = []


class Diag(quax.ArrayValue):
    """A stack of diagonal matrices, shape `(*batch, n, n)`, stored as diagonals. The
    batch shape is a static field, so slicing or stacking changes the structure:
    leaf-by-leaf slicing would be wrong, and the class says how to do it."""

    diagonal: jax.Array
    batch: tuple[int, ...] = eqx.field(static=True)

    def aval(self):
        n = self.diagonal.shape[-1]
        return jax.core.ShapedArray((*self.batch, n, n), self.diagonal.dtype)

    def materialise(self):
        DIAG_MATERIALISED.append(self.aval().shape)
        n = self.diagonal.shape[-1]
        eye = jnp.eye(n, dtype=self.diagonal.dtype)
        return jnp.einsum("...i,ij->...ij", self.diagonal, eye)

    def mul(self, other: jax.Array, /, **params):
        if other.shape != ():
            return NotImplemented
        DIAG_MUL.append(self.aval().shape)
        return Diag(self.diagonal * other, self.batch)

    rmul = mul

    def unstack(self, length: int):
        if not self.batch or self.batch[0] != length:
            return None
        rest = self.batch[1:]
        return self.diagonal, lambda d: Diag(d, rest)

    def stack(self, length: int):
        batch = (length, *self.batch)
        return self.diagonal, lambda d: Diag(d, batch)


class Tagged(quax.ArrayValue):
    """An array with a static tag; slices and stacks leaf by leaf (`scan_leafwise`)."""

    array: jax.Array
    tag: str = eqx.field(static=True)

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array

    def mul(self, other: jax.Array, /, **params):
        return Tagged(self.array * other, self.tag)

    rmul = mul

    def scan_leafwise(self):
        return True


def _diag(key, batch=(4,), n=3):
    return Diag(jax.random.normal(key, (*batch, n)), batch)


def _layers(ds, x):
    # `d * 2.0` runs `Diag.mul` on each slice; `x @ d` materialises one slice.
    def layer(h, d):
        h = jnp.tanh(h @ (d * 2.0))
        return h, jnp.sum(h)

    return jax.lax.scan(layer, x, ds)


@pytest.mark.parametrize("mode", ("jit_outside", "grad", "vmap"))
def test_xs_with_static_structure(mode, getkey):
    ds = _diag(getkey())
    assert_matches_dense(_layers, ds, jnp.ones((2, 3)), mode=mode)


def test_xs_slices_reach_the_body_as_values(getkey):
    ds = _diag(getkey())
    DIAG_MUL.clear()
    DIAG_MATERIALISED.clear()
    # Walked afresh: the trace (and its walk) is not cached.
    jax.make_jaxpr(quax.quaxify(_layers, cache=False))(ds, jnp.ones((2, 3)))
    # `mul` ran on a (3, 3) slice, and only slices were materialised, never the stack.
    assert (3, 3) in DIAG_MUL
    assert DIAG_MATERIALISED and set(DIAG_MATERIALISED) == {(3, 3)}


@pytest.mark.parametrize("mode", ("grad", "vmap"))
def test_ys_with_static_structure(mode, getkey):
    ds = _diag(getkey())

    def fn(c0, ds):
        return jax.lax.scan(lambda c, d: (c * 0.5, d * c), c0, ds)

    assert_matches_dense(fn, jnp.asarray(3.0), ds, mode=mode)


def test_ys_are_stacked_values(getkey):
    ds = _diag(getkey(), batch=(4, 2))
    DIAG_MATERIALISED.clear()
    fn = lambda ds: jax.lax.scan(lambda c, d: (c, d * 2.0), 0.0, ds)
    _, ys = jax.jit(quax.quaxify(fn))(ds)
    assert isinstance(ys, Diag) and ys.batch == (4, 2)
    assert DIAG_MATERIALISED == []
    assert tree_allclose(ys, fn(densify(ds))[1])


@pytest.mark.parametrize("mode", ("eager", "vmap"))
def test_carry_xs_and_ys_together(mode, getkey):
    ds = _diag(getkey())
    carry = _diag(getkey(), batch=())

    def fn(c0, ds):
        # The carry stays a Diag (`mul` by a scalar); xs and ys are Diags.
        return jax.lax.scan(lambda c, d: (c * 0.5, d * 3.0), c0, ds)

    assert_matches_dense(fn, carry, ds, mode=mode)
    c, ys = quax.quaxify(fn)(carry, ds)
    assert isinstance(c, Diag) and isinstance(ys, Diag)


def test_lax_map_keeps_values(getkey):
    ds = _diag(getkey(), batch=(5,))
    DIAG_MATERIALISED.clear()
    out = jax.jit(quax.quaxify(lambda ds: jax.lax.map(lambda d: d * 2.0, ds)))(ds)
    assert isinstance(out, Diag) and out.batch == (5,)
    assert DIAG_MATERIALISED == []
    assert tree_allclose(out, 2.0 * densify(ds))


@pytest.mark.parametrize("reverse", [False, True])
def test_leafwise_tag_type(reverse, getkey):
    xs = Tagged(jax.random.normal(getkey(), (4, 3)), "metres")

    def fn(c0, xs):
        return jax.lax.scan(
            lambda c, x: (c + jnp.sum(x), x * c), c0, xs, reverse=reverse
        )

    _, ys = quax.quaxify(fn)(jnp.asarray(1.0), xs)
    assert isinstance(ys, Tagged) and ys.tag == "metres"
    assert_matches_dense(fn, jnp.asarray(1.0), xs, mode="grad" if reverse else "vmap")


def _biased_layers(ws, bs, x):
    def layer(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b[None, :]), None

    return jax.lax.scan(layer, x, (ws, bs))[0]


def test_zero_bias_in_scanned_layers_stays_zero(getkey):
    """Issue 12.4: a `Zero` bias stacked over layers is a `Zero` in the body, so the
    scanned program has no `add` (and no zeros) for it."""
    ws = jax.random.normal(getkey(), (4, 3, 3))
    bs = Zero((4, 3), jnp.float32)
    x = jnp.ones((2, 3))
    out = quax.quaxify(_biased_layers)(ws, bs, x)
    assert tree_allclose(out, _biased_layers(ws, densify(bs), x))

    def body_eqns(jaxpr):
        (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
        return [e.primitive.name for e in scan.params["jaxpr"].jaxpr.eqns]

    quaxed = body_eqns(walked(jax.make_jaxpr(quax.quaxify(_biased_layers))(ws, bs, x)))
    dense = body_eqns(jax.make_jaxpr(_biased_layers)(ws, densify(bs), x))
    assert "add" in dense and "add" not in quaxed
    assert len(quaxed) < len(dense)
    # And nothing of the bias's size is an operand of the quaxified scan.
    top = walked(jax.make_jaxpr(quax.quaxify(_biased_layers))(ws, bs, x)).jaxpr
    assert all(v.aval.shape != (4, 3) for e in top.eqns for v in e.invars)


@pytest.mark.parametrize("mode", ("grad", "vmap"))
def test_zero_bias_matches_dense(mode, getkey):
    ws = jax.random.normal(getkey(), (4, 3, 3))
    fn = lambda x, ws, bs: _biased_layers(ws, bs, x)
    assert_matches_dense(fn, jnp.ones((2, 3)), ws, Zero((4, 3), jnp.float32), mode=mode)


def test_zero_ys_are_stacked_zeros():
    fn = lambda z: jax.lax.scan(lambda c, x: (c + 1.0, z * c), 0.0, None, length=5)
    _, ys = quax.quaxify(fn)(Zero((3,), jnp.float32))
    assert isinstance(ys, Zero) and ys.shape == (5, 3)
    # Zero xs of the wrong length cannot occur (JAX checks), but a Zero carry is
    # kept and the ys Zero has the dtype JAX traced.
    assert ys.dtype == jnp.float32


def test_lora_stack_as_xs_and_ys(getkey):
    w = jax.random.normal(getkey(), (3, 4, 4))
    lora = LoraArray(w, rank=2, key=getkey())
    lora = eqx.tree_at(lambda t: t.b, lora, jax.random.normal(getkey(), lora.b.shape))
    # LoRA refuses to materialise: this runs only if the stack is sliced and stacked.
    fn = lambda ws: jax.lax.scan(lambda c, w: (c, -w), 0.0, ws)
    _, ys = quax.quaxify(fn)(lora)
    assert isinstance(ys, LoraArray)
    assert tree_allclose(ys.w, -w) and tree_allclose(ys.a, -lora.a)


def test_lowrank_default_hooks_from_scan_leafwise(getkey):
    ws, _ = make_lowrank(getkey(), shape=(4, 3, 3), rank=2)
    hook = ws.unstack(4)
    assert hook is not None
    arrays, rebuild = hook
    assert len(arrays) == 3
    piece = rebuild([a[1] for a in arrays])
    assert tree_allclose(piece, densify(ws)[1], rtol=1e-4, atol=1e-4)
    assert ws.unstack(5) is None  # no leading axis of that length: materialise
    LOWRANK_MATERIALISED.clear()
    out = jax.jit(quax.quaxify(lambda ws: jax.lax.map(lambda w: w, ws)))(ws)
    assert type(out) is type(ws) and LOWRANK_MATERIALISED == []


def test_default_hooks_decline_without_opt_in(getkey):
    ds = Tagged(jnp.ones((4, 3)), "a")
    assert ds.unstack(4) is not None
    z = Zero((4, 3), jnp.float32)
    assert z.unstack(3) is None  # the leading axis does not match


# -- hooks that break their contract: errors, never wrong numbers --


class _BadUnstack(quax.ArrayValue):
    """`unstack` returns arrays without the leading axis (`mode="axis"`) or rebuilds
    slices of the wrong shape (`mode="aval"`); `stack` rebuilds the wrong shape."""

    array: jax.Array
    mode: str = eqx.field(static=True)

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array

    def unstack(self, length: int):
        if self.mode == "axis":
            return self.array[0], lambda a: _BadUnstack(a, self.mode)
        return self.array, lambda a: _BadUnstack(a[:1], self.mode)

    def stack(self, length: int):
        return self.array, lambda a: _BadUnstack(a[0], self.mode)


@pytest.mark.parametrize("mode", ["axis", "aval"])
def test_bad_unstack_is_an_error(mode):
    bad = _BadUnstack(jnp.ones((4, 3)), mode)
    fn = lambda xs: jax.lax.scan(lambda c, x: (c + x, None), jnp.zeros(3), xs)
    with pytest.raises(HandlerResultError, match=r"_BadUnstack\.unstack\(4\)"):
        quax.quaxify(fn)(bad)


def test_bad_stack_is_an_error():
    bad = _BadUnstack(jnp.ones((3,)), "aval")
    fn = lambda v: jax.lax.scan(lambda c, x: (c, v), 0.0, None, length=4)
    with pytest.raises(HandlerResultError, match=r"_BadUnstack\.stack\(4\)") as info:
        quax.quaxify(fn)(bad)
    assert "test_stacking.py" in str(info.value)
