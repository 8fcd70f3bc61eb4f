"""Inside a trace, quaxify rewrites the jaxpr (`quax/_rewrite.py`, issue 10): equations
no value reaches are kept as they are, untraced; runs of equations a value reaches are
traced as fragments; the result is a well-typed jaxpr bound as one `jit` equation."""

import jax
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
