"""Inside a trace, quaxify rewrites the jaxpr (`quax/_rewrite.py`, issue 10): equations
no value reaches are kept as they are, untraced; runs of equations a value reaches are
traced as fragments; the result is a well-typed jaxpr bound as one `jit` equation."""

import jax
import jax.core
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import BUILDERS, Ruleless, Scaled
from helpers import densify, tree_allclose, walked

import quax
from quax._rewrite import _WINDOW, rewrite
from quax.handlers._common import flatten_operands
from quax.handlers._jit import JIT_TRACES
from quax.zero import Zero


def _rewrite(fn, *args):
    """`fn` traced on `args`' avals, then rewritten on `args`."""
    specs = [a.aval() if isinstance(a, quax.ArrayValue) else a for a in args]
    specs = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in specs]
    closed = jax.make_jaxpr(fn)(*specs)
    leaves, spec = flatten_operands(args)
    got = rewrite(closed, list(args), (False,) * len(args), leaves, spec)
    assert got is not None
    new_closed, out_spec, hoisted = got
    assert hoisted == []
    jexc.check_jaxpr(new_closed.jaxpr)
    return closed, new_closed, out_spec


def _chain(v, x):
    for i in range(50):
        x = (jnp.sin, jnp.cos, jnp.exp)[i % 3](x)
    return x + v


def test_equations_no_value_reaches_are_kept_as_they_are():
    v, x = Ruleless(jnp.ones(8)), jnp.ones(8)
    closed, new_closed, _ = _rewrite(_chain, v, x)
    kept = new_closed.jaxpr.eqns[:50]
    # The same equation objects (params, source info and context with them): nothing
    # was traced or bound for them.
    assert all(a is b for a, b in zip(kept, closed.jaxpr.eqns[:50], strict=True))
    out = jexc.jaxpr_as_fun(new_closed)(*flatten_operands([v, x])[0])
    assert tree_allclose(out[0], _chain(densify(v), x))


def test_renamed_operands_are_copies_with_the_same_source_info():
    # `w @ x` with a Scaled `w` is a fragment; the `sin` after it reads its result.
    w = BUILDERS["scaled"](jax.random.key(0))[0]
    x = jnp.ones((w.aval().shape[1],))

    def fn(w, x):
        return jnp.sin(w @ x) * 2.0

    closed, new_closed, _ = _rewrite(fn, w, x)
    (sin_old,) = [e for e in closed.jaxpr.eqns if e.primitive is lax.sin_p]
    (sin_new,) = [e for e in new_closed.jaxpr.eqns if e.primitive is lax.sin_p]
    assert sin_new is not sin_old
    assert sin_new.source_info is sin_old.source_info
    assert sin_new.params == sin_old.params
    leaves = flatten_operands([w, x])[0]
    (out,) = jexc.jaxpr_as_fun(new_closed)(*leaves)
    assert tree_allclose(out, fn(densify(w), x), rtol=1e-5)


def test_value_runs_longer_than_a_window():
    # Every equation meets a Zero: fragments of at most `_WINDOW` equations each.
    z = Zero((4,), jnp.float32)
    n = _WINDOW + 5  # two equations each: three fragments

    def fn(z, x):
        for _ in range(n):
            z = jnp.sin(z) * 2.0
        return z + x, z

    x = jnp.arange(4.0)
    for run in (jax.jit, lambda f: f):
        out, zz = run(quax.quaxify(fn))(z, x)
        assert isinstance(zz, Zero)
        assert tree_allclose(out, x)


def test_folded_constants_are_seen_by_handlers_and_kept_for_the_rest():
    # `jnp.pad(z, 0.0)`: the pad value is a folded literal, so Zero's handler sees 0.
    def fn(z, x):
        c = jnp.asarray(0.0)  # convert_element_type on a literal: foldable
        return jnp.pad(z, 1, constant_values=c), jnp.sin(x) + c

    z, x = Zero((3,), jnp.float32), jnp.arange(3.0)
    closed = jax.make_jaxpr(quax.quaxify(fn))(z, x)
    padded, y = quax.quaxify(fn)(z, x)
    assert isinstance(padded, Zero) and padded.aval().shape == (5,)
    assert tree_allclose(y, jnp.sin(x))
    padded, y = jax.jit(quax.quaxify(fn))(z, x)
    assert isinstance(padded, Zero)
    jexc.check_jaxpr(walked(closed).jaxpr)


def test_first_trace_is_one_jit_equation():
    v, x = Ruleless(jnp.ones(8)), jnp.ones(8)
    closed = jax.make_jaxpr(quax.quaxify(_chain, cache=False))(v, x)
    (eqn,) = closed.jaxpr.eqns
    assert eqn.primitive.name == "jit" and eqn.params["name"] == "_chain"
    jexc.check_jaxpr(closed.jaxpr)


def test_dead_equations_are_dropped():
    # `z * y` with a Zero `z` makes `y`'s equations dead in the rewrite.
    def fn(z, x):
        y = jnp.exp(jnp.sin(x))
        return z * y + x

    closed = jax.make_jaxpr(quax.quaxify(fn))(Zero((3,), jnp.float32), jnp.ones(3))
    assert walked(closed).jaxpr.eqns == []


def test_closed_over_tracers_become_inputs():
    def outer(y, x):
        return quax.quaxify(lambda v: v * y + x, cache=False)(Ruleless(x))

    x, y = jnp.arange(3.0), jnp.asarray(2.0)
    out = jax.jit(outer)(y, x)
    assert tree_allclose(out, x * 2.0 + x)
    jexc.check_jaxpr(jax.make_jaxpr(outer)(y, x).jaxpr)


def test_mutable_references_are_walked():
    closed = jax.make_jaxpr(lambda x: jax.new_ref(x)[...] + 1.0)(jnp.ones(3))
    leaves, spec = flatten_operands([jnp.ones(3)])
    assert rewrite(closed, [jnp.ones(3)], (False,), leaves, spec) is None


@pytest.mark.parametrize("kind", ["scaled", "zero", "lora", "sparse"])
def test_rewritten_program_under_transformations(kind, getkey):
    value, _ = BUILDERS[kind](getkey())
    shape = value.aval().shape

    def fn(v, x):
        y = jnp.tanh(x) * 3.0 - 1.0
        z = v * y
        return jnp.sum(jnp.sin(z) + jnp.cos(y)) + jnp.sum(x**2)

    x = jnp.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)
    dense = fn(densify(value), x)
    q = quax.quaxify(fn)
    assert tree_allclose(jax.jit(q)(value, x), dense, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda x: q(value, x)))(x)
    assert tree_allclose(g, jax.grad(lambda x: fn(densify(value), x))(x), rtol=1e-4)
    xs = jnp.stack([x, 2 * x])
    vm = jax.jit(jax.vmap(lambda x: q(value, x)))(xs)
    assert tree_allclose(vm, jax.vmap(lambda x: fn(densify(value), x))(xs), rtol=1e-5)


def test_scaled_values_stay_values_through_the_rewrite(getkey):
    value, _ = BUILDERS["scaled"](getkey())
    out = jax.jit(quax.quaxify(lambda v: -(v * 3.0)))(value)
    assert isinstance(out, Scaled)
    assert tree_allclose(densify(out), -(densify(value) * 3.0))


def test_cached_nested_jit_is_spliced_without_a_fragment(getkey, monkeypatch):
    # 8 calls of one jitted block on a LowRank weight: the first is walked (in a
    # fragment); the other 7 find the walked body cached and are emitted directly.
    from builders import make_lowrank

    import quax._rewrite as rewrite_module

    @jax.jit
    def block(h, w):
        return jnp.tanh(h @ w) + h

    def model(w, h):
        for _ in range(8):
            h = block(h, w)
        return h

    w, _ = make_lowrank(getkey(), shape=(4, 4), rank=2)
    h = jnp.ones((2, 4))
    fragments = []
    original = rewrite_module._Rewrite._fragment

    def counting(self, start):
        fragments.append(self.steps[start][0].primitive.name)
        return original(self, start)

    monkeypatch.setattr(rewrite_module._Rewrite, "_fragment", counting)
    JIT_TRACES.clear()
    closed = jax.make_jaxpr(quax.quaxify(model, cache=False))(w, h)
    assert (JIT_TRACES.misses, JIT_TRACES.hits) == (1, 7)  # one walk of the block
    # The first call's fragment, and inside it the rewrite of the block's body (its
    # `h @ w` meets the LowRank); nothing for the other seven calls.
    assert fragments == ["jit", "dot_general"]
    jits = [e for e in walked(closed).jaxpr.eqns if e.primitive.name == "jit"]
    assert len(jits) == 8 and len({id(e.params["jaxpr"]) for e in jits}) == 1
    jexc.check_jaxpr(closed.jaxpr)
    out = jax.jit(quax.quaxify(model))(w, h)
    assert tree_allclose(out, model(densify(w), h), rtol=1e-5, atol=1e-5)


# -- scan: the body is rewritten as a jaxpr, not walked in a second trace ------------


@pytest.fixture
def fragments(monkeypatch):
    """The primitive each fragment of the rewrite starts at, in order."""
    import quax._rewrite as rewrite_module

    seen: list[str] = []
    original = rewrite_module._Rewrite._fragment

    def counting(self, start):
        seen.append(self.steps[start][0].primitive.name)
        return original(self, start)

    monkeypatch.setattr(rewrite_module._Rewrite, "_fragment", counting)
    return seen


#: Whether this JAX's `scan` has the params `rewrite_scan` knows (0.10's; JAX 0.11's
#: `ft_in`/`ft_out` FlatTrees are private): elsewhere every scan runs its handler.
SCAN_REWRITES = set(
    jax.make_jaxpr(lambda x: lax.scan(lambda c, _: (c, None), x, length=2))(1.0)
    .jaxpr.eqns[0]
    .params
) == {"reverse", "length", "jaxpr", "num_consts", "num_carry", "unroll"}


def _stacked_lora(getkey, layers=3, d=4):
    import equinox as eqx

    stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(d, d, key=k))(
        jax.random.split(getkey(), layers)
    )
    return quax.lora.loraify(stack, rank=2, key=getkey())


def _scan_layers(stack, x):
    import equinox as eqx

    params, static = eqx.partition(stack, eqx.is_array)

    def body(h, p):
        return jnp.tanh(eqx.combine(p, static)(h)), jnp.sum(h)

    return lax.scan(body, x, params)


def test_scan_over_stacked_lora_is_rewritten(getkey, fragments):
    import equinox as eqx

    lora = _stacked_lora(getkey)
    # Nonzero adapters, so the update is part of every result.
    b = lora.weight.b
    lora = eqx.tree_at(lambda m: m.weight.b, lora, jax.random.normal(getkey(), b.shape))
    x = jnp.linspace(-1.0, 1.0, 4)
    closed = jax.make_jaxpr(quax.quaxify(_scan_layers, cache=False))(lora, x)
    # One fragment, for the LoRA product inside the body; none for the scan itself
    # (the old path traced a walk of the whole body there).
    assert fragments == (["dot_general"] if SCAN_REWRITES else ["scan"])
    (scan,) = [e for e in walked(closed).jaxpr.eqns if e.primitive.name == "scan"]
    body_prims = [e.primitive.name for e in scan.params["jaxpr"].jaxpr.eqns]
    assert "tanh" in body_prims and "reduce_sum" in body_prims
    jexc.check_jaxpr(closed.jaxpr)

    dense = quax.lora.merge(lora)
    q = quax.quaxify(_scan_layers)
    assert tree_allclose(jax.jit(q)(lora, x), _scan_layers(dense, x), rtol=1e-5)
    g = jax.jit(jax.grad(lambda x: q(lora, x)[0].sum()))(x)
    g_dense = jax.grad(lambda x: _scan_layers(dense, x)[0].sum())(x)
    assert tree_allclose(g, g_dense, rtol=1e-5)
    xs = jnp.stack([x, -2.0 * x])
    vm = jax.jit(jax.vmap(lambda x: q(lora, x)))(xs)
    assert tree_allclose(vm, jax.vmap(lambda x: _scan_layers(dense, x))(xs), rtol=1e-5)


def test_scan_keeps_zero_carries_and_ys_as_values(fragments):
    def fn(z, xs):
        def body(c, x):
            return c * 2.0, (z * x, x + 1.0)

        return lax.scan(body, z, xs)

    z, xs = Zero((3,), jnp.float32), jnp.arange(15.0).reshape(5, 3)
    closed = jax.make_jaxpr(quax.quaxify(fn, cache=False))(z, xs)
    assert ("scan" not in fragments) is SCAN_REWRITES
    (scan,) = [e for e in walked(closed).jaxpr.eqns if e.primitive.name == "scan"]
    # Only `x + 1.0` is left to compute: the zeros are symbolic through the loop.
    assert [e.primitive.name for e in scan.params["jaxpr"].jaxpr.eqns] == ["add"]
    jexc.check_jaxpr(closed.jaxpr)
    carry, (zs, ys) = jax.jit(quax.quaxify(fn))(z, xs)
    assert isinstance(carry, Zero) and carry.aval().shape == (3,)
    assert isinstance(zs, Zero) and zs.aval().shape == (5, 3)
    assert tree_allclose(ys, xs + 1.0)


def test_scan_whose_carry_changes_kind_runs_the_handler(fragments):
    # The carry enters a Zero and comes back dense: the rewrite declines and the
    # scan handler finds the carry's kind (a fragment at the scan).
    def fn(z, xs):
        return lax.scan(lambda c, x: (c + x, c * x), z, xs)

    z, xs = Zero((3,), jnp.float32), jnp.arange(15.0).reshape(5, 3)
    out = jax.jit(quax.quaxify(fn, cache=False))(z, xs)
    assert "scan" in fragments
    assert tree_allclose(out, fn(jnp.zeros(3), xs))


def test_scan_with_hooks_that_compute_runs_the_handler(fragments):
    from test_stacking import Diag

    class Copied(Diag):
        """`unstack` computes (a copy of the diagonals): only the walk can run it."""

        def unstack(self, length: int):
            got = super().unstack(length)
            if got is None:
                return None
            diagonal, rebuild = got
            return diagonal + 0.0, lambda d: Copied(d, self.batch[1:])

    def fn(v, h):
        return lax.scan(lambda h, d: (d @ h, None), h, v)[0]

    h = jnp.arange(1.0, 4.0)
    for cls, scan_fragment in ((Diag, False), (Copied, True)):
        fragments.clear()
        v = cls(jnp.arange(12.0).reshape(4, 3), (4,))
        out = jax.jit(quax.quaxify(fn, cache=False))(v, h)
        assert ("scan" in fragments) is (scan_fragment or not SCAN_REWRITES)
        assert tree_allclose(out, fn(densify(v), h))


def test_while_cond_and_body_are_rewritten(getkey, fragments):
    w, _ = BUILDERS["scaled"](getkey())
    x = jnp.linspace(-1.0, 1.0, int(np.prod(w.aval().shape))).reshape(w.aval().shape)

    def fn(w, x):
        def body(c):
            h, i = c
            return jnp.sin(h) + w * h, i + 1

        return lax.while_loop(lambda c: c[1] < 4, body, (x, 0))[0]

    closed = jax.make_jaxpr(quax.quaxify(fn, cache=False))(w, x)
    assert "while" not in fragments and fragments == ["mul"]  # `w * h` alone
    (loop,) = walked(closed).jaxpr.eqns
    assert [e.primitive.name for e in loop.params["cond_jaxpr"].jaxpr.eqns] == ["lt"]
    jexc.check_jaxpr(closed.jaxpr)
    dense = densify(w)
    q = jax.jit(quax.quaxify(fn))
    assert tree_allclose(q(w, x), fn(dense, x), rtol=1e-5)
    xs = jnp.stack([x, 0.5 * x])
    got = jax.vmap(q, in_axes=(None, 0))(w, xs)
    assert tree_allclose(got, jax.vmap(fn, in_axes=(None, 0))(dense, xs), rtol=1e-5)


def test_while_whose_carry_changes_kind_runs_the_handler(fragments):
    def fn(z, x):
        return lax.while_loop(
            lambda c: c[1] < 3, lambda c: (c[0] + x, c[1] + 1), (z, 0)
        )

    z, x = Zero((3,), jnp.float32), jnp.arange(3.0)
    out, n = jax.jit(quax.quaxify(fn, cache=False))(z, x)
    assert "while" in fragments
    assert tree_allclose(out, 3 * x) and n == 3


# -- cond: each branch is rewritten as a jaxpr --------------------------------------


def test_cond_branches_are_rewritten(getkey, fragments):
    w, _ = BUILDERS["scaled"](getkey())
    x = jnp.linspace(-1.0, 1.0, int(np.prod(w.aval().shape))).reshape(w.aval().shape)
    branches = [
        lambda w, x: jnp.sin(x) + w * x,
        lambda w, x: jnp.cos(x) * 3.0,
        lambda w, x: -(w * 2.0) * jnp.tanh(x),
    ]

    def fn(i, w, x):
        return lax.switch(i, branches, w, x)

    closed = jax.make_jaxpr(quax.quaxify(fn, cache=False))(0, w, x)
    assert "cond" not in fragments
    (cond,) = [e for e in walked(closed).jaxpr.eqns if e.primitive.name == "cond"]
    assert [e.primitive.name for e in cond.params["branches"][1].jaxpr.eqns] == [
        "cos",
        "mul",
    ]
    jexc.check_jaxpr(closed.jaxpr)
    dense = densify(w)
    q = jax.jit(quax.quaxify(fn))
    for i in range(3):
        assert tree_allclose(q(i, w, x), fn(i, dense, x), rtol=1e-5)
        g = jax.grad(lambda x, i=i: q(i, w, x).sum())(x)
        dense_g = jax.grad(lambda x, i=i: fn(i, dense, x).sum())(x)
        assert tree_allclose(g, dense_g, rtol=1e-5)
    idx, xs = jnp.array([2, 0]), jnp.stack([x, 0.5 * x])
    got = jax.vmap(q, in_axes=(0, None, 0))(idx, w, xs)
    assert tree_allclose(got, jax.vmap(fn, in_axes=(0, None, 0))(idx, dense, xs))


def test_cond_keeps_values_every_branch_returns(fragments):
    def fn(p, z):
        return lax.cond(p, lambda z: z * 2.0, lambda z: -z, z)

    out = jax.jit(quax.quaxify(fn, cache=False))(True, Zero((3,), jnp.float32))
    assert "cond" not in fragments
    assert isinstance(out, Zero)


def test_cond_whose_branches_disagree_runs_the_handler(fragments):
    def fn(p, z, x):
        return lax.cond(p, lambda z, x: z * x, lambda z, x: z + x, z, x)

    z, x = Zero((3,), jnp.float32), jnp.arange(3.0)
    q = jax.jit(quax.quaxify(fn, cache=False))
    assert tree_allclose(q(False, z, x), x) and tree_allclose(q(True, z, x), 0 * x)
    assert "cond" in fragments


#: A concrete array that `Offset.materialise` closes over: each fragment that
#: materialises an `Offset` holds it as a constant.
OFFSET = jnp.arange(1.0, 4.0)


class Offset(quax.ArrayValue):
    x: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.x.shape, self.x.dtype)

    def materialise(self):
        return self.x + OFFSET


@pytest.mark.parametrize("loop", ["cond", "scan", "while"])
def test_constants_made_inside_bodies_become_operands(loop, fragments):
    def fn(v, x):
        if loop == "cond":
            return lax.cond(x[0] > 0, lambda x: v * x, lambda x: v + x, x)
        if loop == "scan":
            return lax.scan(lambda h, _: (jnp.sin(v * h), None), x, length=3)[0]
        return lax.while_loop(
            lambda c: c[1] < 3, lambda c: (jnp.sin(v * c[0]), c[1] + 1), (x, 0)
        )[0]

    v, x = Offset(jnp.ones(3)), jnp.array([1.0, -2.0, 0.5])
    closed = jax.make_jaxpr(quax.quaxify(fn, cache=False))(v, x)
    assert (loop not in fragments) is (loop != "scan" or SCAN_REWRITES)
    jexc.check_jaxpr(closed.jaxpr)
    for sign in (1.0, -1.0):
        got = jax.jit(quax.quaxify(fn))(v, sign * x)
        assert tree_allclose(got, fn(densify(v), sign * x), rtol=1e-6)
