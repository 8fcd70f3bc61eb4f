"""`custom_vjp_call`: custom VJP rules survive quaxify (issue 3)."""

import functools as ft

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from builders import LowRank, Scaled
from helpers import densify, tree_allclose
from test_custom_jvp import (
    _WEIGHTS,
    _X,
    Dense,
    Doubled,
    Unlifted,
    derivatives,
    lifted_params,
)

import quax


@jax.custom_vjp
def clip_gradient(x):
    """The identity whose cotangent is clipped to [-0.5, 0.5]."""
    return x


clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.5, 0.5),))


@ft.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scaled_tanh(x, power):
    """tanh(x) ** power whose backward pass ignores the power (deliberately wrong)."""
    return jnp.tanh(x) ** power


def _scaled_tanh_fwd(x, power):
    return jnp.tanh(x) ** power, x


def _scaled_tanh_bwd(power, x, g):
    return (g * (1.0 - jnp.tanh(x) ** 2),)


scaled_tanh.defvjp(_scaled_tanh_fwd, _scaled_tanh_bwd)


@jax.custom_vjp
def mul_two(x, y):
    return x * y


mul_two.defvjp(lambda x, y: (x * y, (x, y)), lambda r, g: (2.0 * g * r[1], g * r[0]))


_W = jnp.array([[-1.0, 2.0, 0.5], [3.0, -0.5, 0.0]])
_A = jnp.array([[1.0], [0.5]])
_B = jnp.array([[1.0, -2.0, 0.5]])


def _lowrank_grads(fn):
    def loss(w, a, b, quaxed):
        v = LowRank(w, a, b)
        out = quax.quaxify(fn)(v) if quaxed else fn(densify(v))
        return jnp.sum(out * jnp.arange(1.0, 4.0)[None, :])

    got = jax.grad(loss, argnums=(0, 1, 2))(_W, _A, _B, True)
    expected = jax.grad(loss, argnums=(0, 1, 2))(_W, _A, _B, False)
    return got, expected


@pytest.mark.parametrize(
    "fn",
    [clip_gradient, lambda x: scaled_tanh(x, 3.0), lambda x: mul_two(x, x + 1.0)],
    ids=["clip_gradient", "nondiff_argnums", "two_operands"],
)
def test_grad_through_custom_vjp_of_lowrank(fn):
    got, expected = _lowrank_grads(fn)
    assert tree_allclose(got, expected)


def test_clipping_happens():
    got, _ = _lowrank_grads(clip_gradient)
    # The cotangent is arange(1, 4) per row, clipped to 0.5 by the rule.
    assert tree_allclose(got[0], jnp.full(_W.shape, 0.5))


def test_custom_vjp_with_value_and_plain_operands_under_jit_vmap():
    def loss(factor, y, quaxed):
        x = Scaled(jnp.array([1.0, -2.0, 3.0]), factor)
        fn = lambda x, y: jnp.sum(mul_two(x, y))
        return quax.quaxify(fn)(x, y) if quaxed else fn(densify(x), y)

    factors, y = jnp.array([0.5, 2.0]), jnp.array([1.0, 2.0, 3.0])
    grad = lambda q: jax.vmap(
        jax.grad(lambda s, y: loss(s, y, q), argnums=(0, 1)), (0, None)
    )
    assert tree_allclose(jax.jit(grad(True))(factors, y), grad(False)(factors, y))


def test_primal_value_and_vjp_function():
    v = Scaled(jnp.array([0.5, -1.0]), jnp.asarray(3.0))

    def f(s, quaxed):
        x = Scaled(v.array, s)
        return quax.quaxify(clip_gradient)(x) if quaxed else clip_gradient(densify(x))

    out, pull = jax.vjp(lambda s: f(s, True), 3.0)
    out_d, pull_d = jax.vjp(lambda s: f(s, False), 3.0)
    assert tree_allclose(out, out_d)
    ct = jnp.array([2.0, -0.1])
    assert tree_allclose(pull(ct), pull_d(ct))


# -- only what is perturbed; pulled back by the type (issue 12.1) -----------------------


@eqx.filter_custom_vjp
def eqx_matvec(w, x, scale):
    """`scale * w @ x`, differentiable in `w` only (equinox asserts that `x` and
    `scale`, its non-differentiable arguments, are never perturbed)."""
    return scale * (w @ x)


@eqx_matvec.def_fwd
def _eqx_matvec_fwd(perturbed, w, x, scale):
    return scale * (w @ x), None


@eqx_matvec.def_bwd
def _eqx_matvec_bwd(residuals, g, perturbed, w, x, scale):
    return scale * jnp.outer(g, x)


class Refusing(quax.ArrayValue):
    """`w + u vᵀ`, which refuses to materialise but says how tangents and
    cotangents cross `materialise()`, and multiplies by vectors structurally."""

    w: jax.Array
    u: jax.Array
    v: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self):
        raise RuntimeError("Refusing to materialise.")

    def dot_general(self, other: jax.Array, /, *, dimension_numbers, **params):
        if other.ndim != 1 or dimension_numbers != (((1,), (0,)), ((), ())):
            return NotImplemented
        return self.w @ other + self.u * (self.v @ other)

    def pushforward(self, tangent):
        return tangent.w + jnp.outer(tangent.u, self.v) + jnp.outer(self.u, tangent.v)

    def pullback(self, cotangent):
        return Refusing(cotangent, cotangent @ self.v, cotangent.T @ self.u)


def _refusing():
    return Refusing(
        jnp.arange(6.0).reshape(2, 3) / 6, jnp.array([1.0, -1.0]), jnp.ones(3)
    )


def _dense(r):
    return r.w + jnp.outer(r.u, r.v)


def test_filter_custom_vjp_with_a_value_and_nondiff_arguments():
    # `x` is closed over and `scale` is an argument equinox declares
    # non-differentiable: neither may arrive perturbed.
    x, scale = jnp.array([1.0, 2.0, -1.0]), jnp.asarray(3.0)
    f = lambda r: jnp.sum(jnp.sin(eqx_matvec(r, x, scale)))
    got = jax.jit(jax.grad(quax.quaxify(f)))(_refusing())
    expected = jax.grad(lambda w, u, v: f(w + jnp.outer(u, v)), argnums=(0, 1, 2))(
        *jtu.tree_leaves(_refusing())
    )
    assert tree_allclose(jtu.tree_leaves(got), list(expected))


def test_refusing_type_pulls_back_through_its_hook():
    # `jax.custom_vjp` rule of a user: the value is used through `dot_general` in
    # fwd and bwd, and its cotangent goes back with `Refusing.pullback`.
    x = jnp.array([0.5, 1.0, -2.0])
    f = lambda r: jnp.sum(mul_two(r @ x, jnp.ones(2)))
    got = jax.grad(quax.quaxify(f))(_refusing())
    expected = jax.grad(lambda r: jnp.sum(mul_two(_dense(r) @ x, jnp.ones(2))))(
        _refusing()
    )
    assert tree_allclose(jtu.tree_leaves(got), jtu.tree_leaves(expected))


# -- output values stay values when their class lifts tangents (issue 13.5) -------------

_LIFTED = {
    "Dense-clip_gradient": (Dense, clip_gradient),
    "Dense-nondiff_argnums": (Dense, lambda x: scaled_tanh(x, 3.0)),
    "Dense-two_operands": (Dense, lambda x: mul_two(x, x + 1.0)),
    "Doubled-clip_gradient": (Doubled, clip_gradient),
}


@pytest.mark.parametrize(
    "name", lifted_params(sorted(_LIFTED), {"Dense-nondiff_argnums"})
)
def test_custom_vjp_outputs_stay_values_with_dense_derivatives(name):
    cls, fn = _LIFTED[name]
    out = jax.jit(quax.quaxify(fn))(cls(_X))
    assert type(out) is cls and tree_allclose(densify(out), fn(densify(cls(_X))))
    got = derivatives(fn, cls, quaxed=True, forward=False)
    assert tree_allclose(got, derivatives(fn, cls, quaxed=False, forward=False))
    if fn is clip_gradient:  # the rule is kept: cotangents are clipped to 0.5
        chain = 2.0 if cls is Doubled else 1.0  # d materialise / d array
        assert tree_allclose(got["grad_of_jit"], jnp.full(4, 0.5 * chain))


@jax.custom_vjp
def relu_by_where(x):
    """`max(x, 0)`, whose forward rule computes it with `where` (which `Doubled`
    does not keep) and whose backward pass halves the cotangent."""
    return jnp.maximum(x, 0.0)


relu_by_where.defvjp(
    lambda x: (jnp.where(x > 0, x, 0.0), x > 0),
    lambda positive, g: (jnp.where(positive, 0.5 * g, 0.0),),
)


def test_a_forward_rule_computing_the_value_otherwise():
    # The primal keeps a `Doubled`; the forward rule's output is dense, so the
    # primal's value is used (JAX asks the two to be equal).
    assert type(quax.quaxify(relu_by_where)(Doubled(_X))) is Doubled
    got = derivatives(relu_by_where, Doubled, quaxed=True, forward=False)
    assert tree_allclose(
        got, derivatives(relu_by_where, Doubled, quaxed=False, forward=False)
    )


def test_a_type_that_lifts_no_tangent_is_materialised():
    out = jax.jit(quax.quaxify(clip_gradient))(Unlifted(_X))
    assert not isinstance(out, quax.Value) and tree_allclose(out, _X)
    got = derivatives(clip_gradient, Unlifted, quaxed=True, forward=False)
    assert tree_allclose(
        got, derivatives(clip_gradient, Unlifted, quaxed=False, forward=False)
    )
    assert tree_allclose(got["grad"], jnp.minimum(_WEIGHTS, 0.5))


@jax.custom_vjp
def _sin_times(x):
    return jnp.sin(x) * x


_sin_times.defvjp(
    lambda x: (_sin_times(x), x),
    lambda x, g: (g * (jnp.cos(x) * x + jnp.sin(x)),),
)


def test_custom_vjp_pulls_back_to_a_lora_whose_weight_is_quantized():
    """Found by the fuzzer: the QLoRA pattern (a `LoraArray` whose frozen `w` is a
    `QuantizedArray`, two leaves) through a `custom_vjp`: its pullback gives no
    cotangent to either leaf of `w`, and the adapters' match the merged weight's."""
    import jax.random as jr
    from builders import make_lora_on_quantized

    lora, merged = make_lora_on_quantized(jr.key(0))

    def loss(x):
        return jnp.sum(_sin_times(x) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(quax.quaxify(loss)))(lora)
    assert grads.w.q is None
    assert grads.w.scale is None or not jnp.any(grads.w.scale)  # frozen
    ct = jax.grad(loss)(merged)  # d loss / d merged weight
    assert jnp.allclose(grads.a, ct @ lora.b.T, rtol=1e-5, atol=1e-6)
    assert jnp.allclose(grads.b, lora.a.T @ ct, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads.a).max()) > 1e-3  # not a trivial zero
