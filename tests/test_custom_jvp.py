"""`custom_jvp_call`: custom JVP rules survive quaxify (issue 3).

Each test compares derivatives of a quaxified function with those of the dense
function, differentiating the leaves of a value whose `materialise()` is nonlinear in
them (LowRank: `w + a @ b`), at points where the custom rule differs from
differentiating the primal.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from builders import LowRank, Scaled
from helpers import densify, tree_allclose

import quax
from quax.zero import Zero


@jax.custom_jvp
def clip_grad(x):
    """The identity, whose derivative is damped to 0.1 outside [-1, 1] (a rule that
    is linear in the tangent, so reverse mode can transpose it)."""
    return x


@clip_grad.defjvp
def _clip_grad_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x, jnp.where(jnp.abs(x) <= 1.0, t, 0.1 * t)


@jax.custom_jvp
def wrong_square(x):
    """x ** 2 with a deliberately different derivative (3 instead of 2 x)."""
    return x**2


@wrong_square.defjvp
def _wrong_square_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x**2, 3.0 * t


def _lowrank(w, a, b):
    return LowRank(w, a, b)


def _grads(fn, w, a, b):
    """Gradients of sum(fn(w + a @ b)) in (w, a, b), quaxified and dense."""

    def loss(w, a, b, quaxed):
        v = _lowrank(w, a, b)
        return jnp.sum(quax.quaxify(fn)(v) if quaxed else fn(densify(v)))

    got = jax.grad(loss, argnums=(0, 1, 2))(w, a, b, True)
    expected = jax.grad(loss, argnums=(0, 1, 2))(w, a, b, False)
    return got, expected


# `w` is chosen so that `w + a @ b` has exact zeros (relu's kink) and large entries.
_W = jnp.array([[-1.0, 2.0, 0.5], [3.0, -0.5, 0.0]])
_A = jnp.array([[1.0], [0.0]])
_B = jnp.array([[1.0, -2.0, 0.5]])


@pytest.mark.parametrize(
    "fn",
    [jax.nn.relu, jax.nn.softplus, jax.nn.gelu, jax.nn.silu, clip_grad, wrong_square],
    ids=["relu", "softplus", "gelu", "silu", "clip_grad", "wrong_square"],
)
def test_grad_through_custom_jvp_of_lowrank(fn):
    got, expected = _grads(fn, _W, _A, _B)
    assert tree_allclose(got, expected)


def test_relu_at_zero():
    # w + a @ b is exactly 0 at [0, 0]: relu's rule gives derivative 0 there.
    got, expected = _grads(jax.nn.relu, _W, _A, _B)
    dense_v = densify(_lowrank(_W, _A, _B))
    assert dense_v[0, 0] == 0.0 and got[0][0, 0] == 0.0
    assert tree_allclose(got, expected)


def test_custom_rule_is_used_not_the_primal_derivative():
    got, _ = _grads(wrong_square, _W, _A, _B)
    # The rule says d/dw = 3 everywhere; differentiating x**2 would give 2 x.
    assert tree_allclose(got[0], jnp.full(_W.shape, 3.0))


def test_logsumexp_jvp():
    v = Scaled(jnp.array([1.0, 2.0, 3.0]), jnp.asarray(2.0))
    fn = lambda x: jax.nn.logsumexp(x)

    def f(factor, quaxed):
        x = Scaled(v.array, factor)
        return quax.quaxify(fn)(x) if quaxed else fn(densify(x))

    got = jax.jvp(lambda s: f(s, True), (2.0,), (1.0,))
    expected = jax.jvp(lambda s: f(s, False), (2.0,), (1.0,))
    assert tree_allclose(got, expected)


def test_clip_grad_of_scaled_under_jit_and_vmap():
    def loss(factor, quaxed):
        x = Scaled(jnp.array([1.0, -2.0, 3.0]), factor)
        fn = lambda x: jnp.sum(clip_grad(x * x))
        return quax.quaxify(fn)(x) if quaxed else fn(densify(x))

    factors = jnp.array([0.5, 2.0])
    got = jax.jit(jax.vmap(jax.grad(lambda s: loss(s, True))))(factors)
    expected = jax.vmap(jax.grad(lambda s: loss(s, False)))(factors)
    assert tree_allclose(got, expected)


def test_primal_keeps_handlers_inside():
    # The primal of a custom_jvp function is walked: Scaled.neg runs there, and the
    # result equals the dense one.
    @jax.custom_jvp
    def f(x):
        return -x

    f.defjvp(lambda p, t: (-p[0], -t[0]))
    v = Scaled(jnp.ones(3), jnp.asarray(2.0))
    assert tree_allclose(quax.quaxify(f)(v), -densify(v))


# -- only what is perturbed is differentiated (issue 12.1) ------------------------------


@jax.custom_jvp
def matvec(w, x):
    """`w @ x`, with its own (correct) rule: a user function taking a weight."""
    return w @ x


@matvec.defjvp
def _matvec_jvp(primals, tangents):
    (w, x), (w_dot, x_dot) = primals, tangents
    return w @ x, w_dot @ x + w @ x_dot


def test_grad_of_x_with_a_frozen_default_lora_weight():
    # The weight's tangent is zero: its (refusing) LoraArray is never materialised,
    # and the rule's `w @ x_dot` runs LoRA's low-rank matmul.
    w = jr.normal(jr.key(0), (3, 4))
    lora = quax.lora.LoraArray(w, rank=2, key=jr.key(1))
    lora = eqx.tree_at(lambda lo: lo.b, lora, jnp.ones_like(lora.b))
    x = jnp.arange(4.0)
    f = lambda lora, x: jnp.sum(jnp.tanh(matvec(lora, x)))
    got = jax.jit(jax.grad(quax.quaxify(f), argnums=1))(lora, x)
    expected = jax.grad(f, argnums=1)(quax.lora.merge(lora), x)
    assert tree_allclose(got, expected)


def test_grad_of_adapters_through_a_user_rule():
    # The adapters are perturbed: their tangent is LoRA's low-rank pushforward.
    w = jr.normal(jr.key(0), (3, 4))
    lora = quax.lora.LoraArray(w, rank=2, key=jr.key(1))
    x = jnp.arange(4.0)
    f = lambda lora: jnp.sum(jnp.tanh(matvec(lora, x)))
    params, static = eqx.partition(lora, quax.lora.trainable(lora))
    got = jax.grad(lambda p: quax.quaxify(f)(eqx.combine(p, static)))(params)
    expected = jax.grad(lambda p: f(quax.lora.merge(eqx.combine(p, static))))(params)
    assert tree_allclose((got.a, got.b), (expected.a, expected.b))


# -- outputs that carry no derivative stay values (issue 13.5) --------------------------


def test_relu_of_zero_is_zero_and_differentiates():
    z = Zero((3,), jnp.float32)
    assert isinstance(quax.quaxify(jax.nn.relu)(z), Zero)
    assert isinstance(jax.jit(quax.quaxify(jax.nn.relu))(z), Zero)
    # Under `jax.grad` outside quaxify: relu(0) + x has gradient 1 in x.
    f = lambda z, x: jnp.sum(jax.nn.relu(z) * x + jax.nn.relu(x))
    x = jnp.array([-1.0, 0.0, 2.0])
    got = jax.grad(lambda x: quax.quaxify(f)(z, x))(x)
    expected = jax.grad(lambda x: f(jnp.zeros(3), x))(x)
    assert tree_allclose(got, expected)


def test_a_zero_output_of_a_perturbed_call_keeps_the_rule():
    # `z * x` is a `Zero`, but the rule gives it the tangent of `x`: a `Zero` cannot
    # carry it, so the output is materialised and the derivative is the rule's.
    @jax.custom_jvp
    def f(z, x):
        return z * x

    f.defjvp(lambda p, t: (p[0] * p[1], t[1]))
    z, x = Zero((3,), jnp.float32), jnp.array([1.0, -2.0, 3.0])
    got = jax.grad(lambda x: quax.quaxify(lambda z, x: jnp.sum(f(z, x) + x))(z, x))(x)
    assert tree_allclose(got, jnp.full(3, 2.0))


# -- output values stay values when their class lifts tangents (issue 13.5) -------------


def _unwrap(x: Any) -> Any:
    return x.array if isinstance(x, Dense) else x


class Dense(quax.ArrayValue):
    """A dense array that every first-order primitive keeps wrapped (`default`), and
    whose derivatives cross `materialise()` unchanged, so it lifts every tangent."""

    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array

    @staticmethod
    def default(primitive, operands, params):
        cls = next(type(x) for x in operands if isinstance(x, Dense))
        out = primitive.bind(*[_unwrap(x) for x in operands], **params)
        return [cls(o) for o in out] if primitive.multiple_results else cls(out)

    def pushforward(self, tangent):
        return tangent.array

    def pullback(self, cotangent):
        return Dense(cotangent)

    def lift_tangent(self, tangent) -> "Dense | None":
        return type(self)(tangent)


class Unlifted(Dense):
    """`Dense` that lifts no tangent: outputs of custom rules are materialised."""

    def lift_tangent(self, tangent):
        return None


class Doubled(quax.ArrayValue):
    """`2 * array`, kept by `relu` (`max` with 0): lifting a tangent halves it, so
    the lift and its transpose are not the identity."""

    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return 2.0 * self.array

    def max(self, other: Any, /, **params):
        if isinstance(other, jax.core.Tracer) or np.any(np.asarray(other) != 0):
            return NotImplemented
        return Doubled(jnp.maximum(self.array, 0.0))

    def pushforward(self, tangent):
        return 2.0 * tangent.array

    def pullback(self, cotangent):
        return Doubled(2.0 * cotangent)

    def lift_tangent(self, tangent):
        return Doubled(tangent / 2.0)


# Exact zeros (relu's kink, sinc's removable singularity) and large entries.
_X = jnp.array([-1.0, 0.0, 0.5, 2.0])
_Y = jnp.array([0.3, -0.2, 0.0, 1.0])
_WEIGHTS = jnp.arange(1.0, 5.0)


def derivatives(
    fn: Callable, wrap: Callable, quaxed: bool, forward: bool = True
) -> Any:
    """Derivatives of `sum(fn(v) * weights)` for `v = wrap(x)`, quaxified (else on
    `v` materialised), in one jit: `jax.grad` in `x` outside quaxify (of the
    function, of its `jax.jit`, per row under `jax.vmap`), `jax.grad` in `v` inside
    quaxify, and with `forward`, `jax.jvp` in `x`."""
    call = quax.quaxify(fn) if quaxed else fn

    def value(x):
        return wrap(x) if quaxed else densify(wrap(x))

    def loss(x):
        return jnp.sum(densify(call(value(x))) * _WEIGHTS)

    def inside(x):
        grad = jax.grad(lambda v: jnp.sum(fn(v) * _WEIGHTS))
        return densify((quax.quaxify(grad) if quaxed else grad)(value(x)))

    def run(x, batch):
        out = {
            "grad": jax.grad(loss)(x),
            "grad_of_jit": jax.grad(jax.jit(loss))(x),
            "vmap_grad": jax.vmap(jax.grad(loss))(batch),
            "grad_inside": inside(x),
        }
        if forward:
            out["jvp"] = jax.jvp(loss, (x,), (_Y,))
        return out

    return jax.jit(run)(_X, jnp.stack([_X, _Y]))


_LIFTED = {
    "Dense-relu": (Dense, jax.nn.relu),
    "Dense-logaddexp": (Dense, lambda a: jnp.logaddexp(a, _Y)),
    "Doubled-relu": (Doubled, jax.nn.relu),
    "Doubled-clip_grad": (Doubled, clip_grad),
}


#: In `make test-all` only (Doubled's lift is also checked through `clip_grad`).
_SLOW = {"Doubled-relu"}


def lifted_params(names: Any, slow: Any) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow if n in slow else ()) for n in names]


@pytest.mark.parametrize("name", lifted_params(sorted(_LIFTED), _SLOW))
def test_custom_jvp_outputs_stay_values_with_dense_derivatives(name):
    cls, fn = _LIFTED[name]
    out = quax.quaxify(fn)(cls(_X))
    jitted = jax.jit(quax.quaxify(fn))(cls(_X))
    assert type(out) is cls and type(jitted) is cls
    assert tree_allclose(densify(out), fn(densify(cls(_X))))
    assert tree_allclose(densify(jitted), fn(densify(cls(_X))))
    got = derivatives(fn, cls, quaxed=True)
    expected = derivatives(fn, cls, quaxed=False)
    assert tree_allclose(got, expected)


def test_the_rule_is_kept_when_differentiated_after_tracing():
    # `jax.grad(jax.jit(f))` traces `f` with nothing differentiated yet; the rule
    # (derivative 3) must still be the one differentiated, not 2 x from the primal.
    assert type(quax.quaxify(wrong_square)(Dense(_X))) is Dense
    got = derivatives(wrong_square, Dense, quaxed=True)
    assert tree_allclose(got, derivatives(wrong_square, Dense, quaxed=False))
    for mode in ("grad", "grad_of_jit", "grad_inside"):
        assert tree_allclose(got[mode], 3.0 * _WEIGHTS)


@pytest.mark.parametrize(
    "fn",
    [
        jax.nn.relu,
        pytest.param(lambda a: jnp.logaddexp(a, _Y), marks=pytest.mark.slow),
    ],
    ids=["relu", "logaddexp"],
)
def test_a_type_that_lifts_no_tangent_is_materialised(fn):
    out = jax.jit(quax.quaxify(fn))(Unlifted(_X))
    assert not isinstance(out, quax.Value) and tree_allclose(out, fn(_X))
    got = derivatives(fn, Unlifted, quaxed=True)
    assert tree_allclose(got, derivatives(fn, Unlifted, quaxed=False))


def test_a_bad_lift_is_an_error():
    class BadLift(Dense):
        def lift_tangent(self, tangent):
            return Dense(tangent[:1])

    loss = lambda x: jnp.sum(quax.quaxify(jax.nn.relu)(BadLift(x)).array)
    with pytest.raises(quax.QuaxError, match="BadLift.lift_tangent` must return"):
        jax.grad(loss)(_X)
