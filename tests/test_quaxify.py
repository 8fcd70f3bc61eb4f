"""`quax.quaxify`'s contract: what it accepts, what it returns, when it traces
(issue 2, points 5, 6 and 8)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from builders import Pair, Ruleless, Scaled
from helpers import densify, tree_allclose

import quax
from quax._quaxify import TRACES


def _close(a, b):
    return tree_allclose(a, b)


@pytest.fixture
def x(getkey):
    return jr.normal(getkey(), (3, 4))


@pytest.fixture
def y(getkey):
    return jr.normal(getkey(), (3, 4))


# -- what quaxify accepts -------------------------------------------------------------


def test_function(x, y):
    fn = lambda a, b: jnp.sin(a) * b + a
    assert _close(quax.quaxify(fn)(Ruleless(x), y), fn(x, y))


def test_bound_method(x, y):
    class Affine:
        def __init__(self, shift):
            self.shift = shift

        def apply(self, a):
            return jnp.tanh(a) + self.shift

    obj = Affine(y)
    assert _close(quax.quaxify(obj.apply)(Ruleless(x)), obj.apply(x))


def test_equinox_module_with_value_input(getkey):
    mlp = eqx.nn.MLP(4, 2, 5, 2, key=getkey())
    x = jr.normal(getkey(), (4,))
    out = quax.quaxify(mlp)(Ruleless(x))
    assert _close(out, mlp(x))


def test_equinox_module_with_value_weights(getkey):
    lin = eqx.nn.Linear(4, 3, key=getkey())
    x = jr.normal(getkey(), (4,))
    valued = eqx.tree_at(lambda m: m.weight, lin, Ruleless(lin.weight))
    assert _close(quax.quaxify(valued)(x), lin(x))


def test_method_decorator(x, y):
    class Layer(eqx.Module):
        weight: jax.Array | quax.ArrayValue

        @quax.quaxify
        def __call__(self, a):
            return self.weight @ a.T

        @quax.quaxify
        def scaled(self, a, *, factor):
            return (self.weight + a) * factor

    layer = Layer(Ruleless(x))
    assert _close(layer(y), x @ y.T)
    assert _close(layer(Ruleless(y)), x @ y.T)
    assert _close(layer.scaled(y, factor=2.0), (x + y) * 2.0)
    assert isinstance(Layer.__dict__["__call__"], eqx.Module)
    assert Layer.__call__.__wrapped__ is Layer.__dict__["__call__"].fn  # pyright: ignore[reportFunctionMemberAccess, reportAttributeAccessIssue]


def test_kwargs(x, y):
    fn = lambda a, *, b, c=1.0: a * b + c
    got = quax.quaxify(fn)(Ruleless(x), b=Ruleless(y), c=2.0)
    assert _close(got, fn(x, b=y, c=2.0))


def test_pytrees_of_values_in_and_out(x, y):
    def fn(tree):
        a, (b, c) = tree["a"], tree["bc"]
        return {"sum": a + b + c, "same": [a, b], "prod": (a * c,)}

    tree = {"a": Ruleless(x), "bc": (Scaled(y, jnp.asarray(3.0)), y)}
    out = quax.quaxify(fn)(tree)
    expected = fn(densify(tree))
    assert _close(out, expected)
    # Values returned as they are come back as the very same types.
    assert isinstance(out["same"][0], Ruleless)
    assert isinstance(out["same"][1], Scaled)
    assert _close(out["same"][1].factor, jnp.asarray(3.0))


def test_returned_values_keep_their_type(x):
    v = Scaled(x, jnp.asarray(2.0))
    out = quax.quaxify(lambda a: (-a) * 3.0)(v)
    assert isinstance(out, Scaled)
    assert _close(out.array, x) and _close(out.factor, jnp.asarray(-6.0))
    assert _close(out.materialise(), -6.0 * x)


def test_non_array_outputs_pass_through(x):
    out = quax.quaxify(lambda a: (a, None, "text", 3, a.shape))(Ruleless(x))
    assert isinstance(out[0], Ruleless)
    assert out[1:] == (None, "text", 3, (3, 4))


def test_no_value_inputs_behaves_like_original(x):
    calls = []

    def fn(a, n, *, tag):
        calls.append(type(a))
        return a * n, tag, [n]

    out = quax.quaxify(fn)(x, 2, tag="t")
    assert calls == [type(x)]  # called once, directly on the concrete array
    expected = fn(x, 2, tag="t")
    assert _close(out[0], expected[0]) and out[1:] == expected[1:]
    assert quax.quaxify(lambda: 5)() == 5

    class Boom(Exception):
        pass

    def raises(a):
        raise Boom

    with pytest.raises(Boom):
        quax.quaxify(raises)(x)


def test_nested_values(x, y):
    pair = Pair(Ruleless(x), Scaled(y, jnp.asarray(0.5)))
    dense = x + 0.5 * y
    fn = lambda p, b: jnp.sin(p) * b + p
    assert _close(quax.quaxify(fn)(pair, y), fn(dense, y))
    out = quax.quaxify(lambda p: p)(pair)
    assert isinstance(out, Pair) and isinstance(out.right, Scaled)
    nested = Pair(pair, Ruleless(y))
    assert _close(quax.quaxify(jnp.exp)(nested), jnp.exp(dense + y))


def test_filter_spec_passes_value_through_untouched(x, y):
    seen = []

    def inner(a, b):
        return a * b

    def outer(a, b):
        seen.append(b)
        return quax.quaxify(inner)(a, b) + 1.0

    value_b = Scaled(y, jnp.asarray(2.0))
    fn = quax.quaxify(outer, filter_spec=(True, (True, False), True))
    out = fn(Ruleless(x), value_b)
    assert seen and all(b is value_b for b in seen)
    assert _close(out, x * 2.0 * y + 1.0)


def test_filter_spec_passthrough_with_callable(x, y):
    seen = []

    def outer(a, b):
        seen.append(type(b))
        return quax.quaxify(jnp.add)(a, b)

    is_scaled = lambda leaf: not isinstance(leaf, Scaled)
    fn = quax.quaxify(outer, filter_spec=is_scaled)
    out = fn(Ruleless(x), Scaled(y, jnp.asarray(2.0)))
    assert seen == [Scaled]
    assert _close(out, x + 2.0 * y)


def test_not_callable_raises():
    with pytest.raises(quax.QuaxifyTypeError):
        quax.quaxify(3)  # pyright: ignore[reportArgumentType]


# -- concrete arrays stay concrete in eager mode --------------------------------------


def test_nonzero_on_concrete_plain_mask(x):
    mask = jnp.array([True, False, True])
    fn = lambda a, m: a[jnp.nonzero(m)] * 2.0
    assert _close(quax.quaxify(fn)(Ruleless(x), mask), fn(x, mask))
    other = jnp.array([False, True, True])  # not a cached trace of the first mask
    assert _close(quax.quaxify(fn)(Ruleless(x), other), fn(x, other))


def test_python_branch_on_plain_array(x):
    def fn(a, flag):
        if flag[0] > 0:
            return jnp.sin(a)
        return jnp.cos(a)

    for flag in (jnp.array([1.0]), jnp.array([-1.0])):
        assert _close(quax.quaxify(fn)(Ruleless(x), flag), fn(x, flag))


def test_concrete_plain_array_under_jit_raises_like_jax(x):
    fn = lambda a, m: a[jnp.nonzero(m)]
    mask = jnp.array([True, False, True])
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(fn)(x, mask)
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(quax.quaxify(fn))(Ruleless(x), mask)


# -- trace caching --------------------------------------------------------------------


def _counting(fn):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(None)
        return fn(*args, **kwargs)

    return wrapped, calls


def test_same_types_do_not_trace_again(x, y):
    fn, calls = _counting(lambda a, b: jnp.sin(a) + b)
    q = quax.quaxify(fn)
    out1 = q(Ruleless(x), y)
    out2 = q(Ruleless(y), x)  # new data, same types
    assert len(calls) == 1
    assert _close(out1, jnp.sin(x) + y) and _close(out2, jnp.sin(y) + x)
    quax.quaxify(fn)(Ruleless(x), y)  # a fresh wrapper shares the cache
    assert len(calls) == 1
    hits = TRACES.hits
    q(Ruleless(x), y)
    assert TRACES.hits == hits + 1 and len(calls) == 1


@pytest.mark.parametrize(
    "change",
    ["shape", "dtype", "weak_type", "value_type", "static_arg", "tree_structure"],
)
def test_different_avals_or_types_trace_again(x, change):
    dense_fn = lambda a, b, n=1: a * b * n
    fn, calls = _counting(dense_fn)
    q = quax.quaxify(fn)
    b = jnp.asarray(2.0, jnp.float32)
    q(Ruleless(x), b)
    assert len(calls) == 1
    if change == "shape":
        args, kwargs = (Ruleless(x[:2]), b), {}
    elif change == "dtype":
        args, kwargs = (Ruleless(x.astype(jnp.bfloat16)), b.astype(jnp.bfloat16)), {}
    elif change == "weak_type":
        weak = jnp.asarray(2.0)
        assert jax.typeof(weak).weak_type and not jax.typeof(b).weak_type
        args, kwargs = (Ruleless(x), weak), {}
    elif change == "value_type":
        args, kwargs = (Scaled(x, jnp.asarray(1.0)), b), {}
    elif change == "static_arg":
        args, kwargs = (Ruleless(x), b), {"n": 3}
    else:
        args, kwargs = (Pair(Ruleless(x), Ruleless(x)), b), {}
    out = q(*args, **kwargs)
    assert len(calls) == 2
    expected = dense_fn(*densify(args), **kwargs)
    assert _close(out, expected)
    if not isinstance(out, quax.Value):
        assert jax.typeof(out).weak_type == jax.typeof(expected).weak_type
    q(*args, **kwargs)
    assert len(calls) == 2


def test_closed_over_array_changes_are_seen(x):
    box = {"shift": jnp.ones((3, 4))}
    fn = lambda a: a + box["shift"]
    q = quax.quaxify(fn)
    assert _close(q(Ruleless(x)), x + 1.0)
    box["shift"] = jnp.full((3, 4), 5.0)
    assert _close(q(Ruleless(x)), x + 5.0)


def test_cached_trace_never_holds_tracers_of_another_trace(x):
    box = {}
    fn = lambda a: a * box["y"]

    def under_jit(yy):
        box["y"] = yy
        try:
            return quax.quaxify(fn)(Ruleless(x))
        finally:
            del box["y"]  # the test itself must not leak the tracer

    out = jax.jit(under_jit)(jnp.asarray(2.0))
    assert _close(out, 2.0 * x)
    box["y"] = jnp.asarray(3.0)
    assert _close(quax.quaxify(fn)(Ruleless(x)), 3.0 * x)  # no leaked tracer
    out = jax.jit(under_jit)(jnp.asarray(4.0))
    assert _close(out, 4.0 * x)


def test_trace_under_jit_then_eager_reuses_cache(x, y):
    fn, calls = _counting(lambda a, b: jnp.cos(a) * b)
    q = quax.quaxify(fn)
    out_jit = jax.jit(q)(Ruleless(x), y)
    out_eager = q(Ruleless(x), y)
    assert len(calls) == 1
    assert _close(out_jit, jnp.cos(x) * y) and _close(out_eager, jnp.cos(x) * y)


# -- transformations outside and inside -------------------------------------------------


def _f(a, b):
    return jnp.sum(jnp.tanh(a) * b, axis=-1)


def test_jit_outside(x, y):
    assert _close(jax.jit(quax.quaxify(_f))(Ruleless(x), y), _f(x, y))
    assert _close(
        eqx.filter_jit(quax.quaxify(_f))(Scaled(x, jnp.asarray(2.0)), y), _f(2 * x, y)
    )


def test_grad_outside_wrt_plain_argument(x, y):
    got = jax.grad(lambda b: jnp.sum(quax.quaxify(_f)(Ruleless(x), b)))(y)
    expected = jax.grad(lambda b: jnp.sum(_f(x, b)))(y)
    assert _close(got, expected)


def test_grad_outside_wrt_value(x, y):
    got = eqx.filter_grad(lambda a: jnp.sum(quax.quaxify(_f)(a, y)))(Ruleless(x))
    expected = jax.grad(lambda a: jnp.sum(_f(a, y)))(x)
    assert isinstance(got, Ruleless)
    assert _close(got.array, expected)
    got = eqx.filter_grad(lambda a: jnp.sum(quax.quaxify(_f)(a, y)))(
        Scaled(x, jnp.asarray(2.0))
    )
    expected_array, expected_factor = jax.grad(
        lambda a, f: jnp.sum(_f(f * a, y)), argnums=(0, 1)
    )(x, jnp.asarray(2.0))
    assert _close(got.array, expected_array) and _close(got.factor, expected_factor)


def test_vmap_outside(x, y):
    xs, ys = jnp.stack([x, y]), jnp.stack([y, x])
    got = jax.vmap(quax.quaxify(_f), in_axes=(None, 0))(Ruleless(x), ys)
    assert _close(got, jax.vmap(_f, in_axes=(None, 0))(x, ys))
    got = eqx.filter_vmap(quax.quaxify(_f))(Ruleless(xs), ys)
    assert _close(got, jax.vmap(_f)(xs, ys))


def test_jit_inside(x, y):
    calls = []

    @jax.jit
    def inner(a, b):
        calls.append(None)
        return _f(a, b)

    fn = lambda a, b: inner(a, b) + inner(b, a)
    assert _close(quax.quaxify(fn)(Ruleless(x), y), _f(x, y) + _f(y, x))


def test_grad_inside(x, y):
    fn = lambda a, b: jax.grad(lambda c: jnp.sum(_f(a, c)))(b)
    assert _close(quax.quaxify(fn)(Ruleless(x), y), fn(x, y))
    fn = lambda a: jax.grad(lambda c: jnp.sum(jnp.sin(c) ** 2))(a)
    assert _close(quax.quaxify(fn)(Ruleless(x)), fn(x))


def test_vmap_inside(x, y):
    fn = lambda a, b: jax.vmap(jnp.dot, in_axes=(0, None))(a, b[0])
    assert _close(quax.quaxify(fn)(Ruleless(x), y), fn(x, y))
    fn = lambda a: jax.vmap(lambda r: jnp.sum(r * r))(a)
    assert _close(quax.quaxify(fn)(Scaled(x, jnp.asarray(2.0))), fn(2.0 * x))


def test_quaxify_inside_quaxify(x, y):
    fn = lambda a, b: quax.quaxify(jnp.matmul)(a, b.T) * 2.0
    assert _close(quax.quaxify(fn)(Ruleless(x), Ruleless(y)), fn(x, y))


def test_numpy_inputs(x):
    arr = np.asarray(x)
    fn = lambda a, b: a + b
    assert _close(quax.quaxify(fn)(Ruleless(x), arr), x + arr)


# -- a model flattened once (quax/_flat.py) -----------------------------------------------


class _Stack(eqx.Module):
    layers: list
    table: dict
    scale: float = eqx.field(static=True, default=1.0)

    def __call__(self, x):
        for w in self.layers:
            x = jnp.tanh(w @ x)
        return self.scale * (self.table["out"] @ x)


def _stack(getkey):
    layers = [Scaled(jr.normal(getkey(), (4, 4)), jnp.asarray(0.5)) for _ in range(2)]
    return _Stack(layers, {"out": Ruleless(jr.normal(getkey(), (2, 4)))})


def _dense_call(model, x):
    return model.scale * (
        densify(model.table["out"])
        @ jnp.tanh(densify(model.layers[1]) @ jnp.tanh(densify(model.layers[0]) @ x))
    )


def test_model_remembered_and_changes_in_place_seen(getkey):
    """A model's flattening is remembered by identity (from its second call);
    replacing a layer in its list or dict in place is seen on the next call (never
    the old weights)."""
    from quax._flat import FN_MEMO

    x = jr.normal(getkey(), (4,))
    q: Any = quax.quaxify(_stack(getkey))  # `q.fn`: the model it holds
    model = q.fn  # `quaxify` holds a copy of the model it is given
    assert _close(q(x), _dense_call(model, x))
    assert FN_MEMO.get(model) is None
    assert _close(q(x), _dense_call(model, x))
    assert FN_MEMO.get(model) is not None
    model.layers[1] = Scaled(jr.normal(getkey(), (4, 4)), jnp.asarray(2.0))
    assert FN_MEMO.get(model) is None
    assert _close(q(x), _dense_call(model, x))
    model.table["out"] = Ruleless(jr.normal(getkey(), (2, 4)))
    assert _close(q(x), _dense_call(model, x))
    model.layers.append(Scaled(jnp.eye(4), jnp.asarray(3.0)))
    h = jnp.tanh(densify(model.layers[1]) @ jnp.tanh(densify(model.layers[0]) @ x))
    expected = jnp.tanh(densify(model.layers[2]) @ h)
    assert _close(q(x), densify(model.table["out"]) @ expected)


def test_model_memo_does_not_keep_models_alive(getkey):
    import gc
    import weakref

    from quax._flat import FN_MEMO

    x = jr.normal(getkey(), (4,))
    q: Any = quax.quaxify(_stack(getkey))  # `q.fn`: the model it holds
    for _ in range(2):
        q(x)
    before = len(FN_MEMO)
    ref = weakref.ref(q.fn)
    del q
    gc.collect()
    assert ref() is None and len(FN_MEMO) == before - 1


def test_model_memo_skips_what_can_change_unseen(getkey):
    """Mutable static data, numpy leaves and tracers are never remembered."""
    from quax._flat import FN_MEMO

    class WithStatic(eqx.Module):
        w: Scaled
        sizes: list = eqx.field(static=True)

        def __call__(self, x):
            return self.w @ x * len(self.sizes)

    class WithNumpy(eqx.Module):
        w: Scaled
        b: Any  # a numpy array

        def __call__(self, x):
            return self.w @ x, self.b

    w, x = Scaled(jr.normal(getkey(), (4, 4)), jnp.asarray(0.5)), jnp.ones(4)
    static = WithStatic(w, [1, 2])
    numpy = WithNumpy(w, np.ones(4, np.float32))
    for model in (static, numpy):
        q: Any = quax.quaxify(model)
        for _ in range(2):
            q(x)
        assert FN_MEMO.get(q.fn) is None
    q.fn.b.resize((1, 4), refcheck=False)  # reshaped in place: the next call sees it
    assert q(x)[1].shape == (1, 4)

    @jax.jit
    def traced(w, x):
        q: Any = quax.quaxify(WithNumpy(w, jnp.ones(4)))
        out = q(x)[0] + q(x)[0]
        assert FN_MEMO.get(q.fn) is None
        return out

    traced(w, x)
