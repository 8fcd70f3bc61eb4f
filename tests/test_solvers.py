"""lineax and optimistix with a default `LoraArray` (one that refuses to materialise)
in a `FunctionLinearOperator` or in a solver's `args` (issue 12.2): values and
gradients (with respect to the adapters and to a plain input, outside `quaxify`)
equal the same program on the merged dense weight."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import optimistix as optx
import pytest
from helpers import tree_allclose

import quax
from quax.lora import LoraArray


@pytest.fixture(autouse=True)
def _no_tracer_leak_check():
    """JAX 0.10.2's leak checker crashes (IndexError in `_why_alive`) on lineax's
    `linear_solve`, with or without quax (a GMRES solve of `4 * jnp.eye(4)` on a
    `FunctionLinearOperator` under `jax.check_tracer_leaks(True)`, eager or jitted),
    so this module runs without it."""
    with jax.check_tracer_leaks(False):
        yield


N = 4
RTOL = ATOL = 1e-6


def _lora(allow_materialise: bool = False) -> LoraArray:
    """A well-conditioned 4x4 weight with a non-zero low-rank update."""
    w = jr.normal(jr.key(0), (N, N)) / 2 + 4 * jnp.eye(N)
    lora = LoraArray(w, rank=2, key=jr.key(1), allow_materialise=allow_materialise)
    return eqx.tree_at(lambda x: x.b, lora, 0.3 * jr.normal(jr.key(2), lora.b.shape))


def gmres(weight, y):
    structure = jax.ShapeDtypeStruct((N,), jnp.float32)
    operator = lx.FunctionLinearOperator(lambda v: weight @ v, structure)
    return lx.linear_solve(operator, y, lx.GMRES(rtol=RTOL, atol=ATOL)).value


def newton(weight, y):
    def fn(x, weight):
        return weight @ x + 0.1 * x**3 - y

    return optx.root_find(
        fn, optx.Newton(rtol=RTOL, atol=ATOL), jnp.zeros(N), weight
    ).value


def bfgs(weight, y):
    def fn(x, weight):
        return jnp.sum((weight @ x - y) ** 2) + 0.1 * jnp.sum(x**4)

    return optx.minimise(
        fn, optx.BFGS(rtol=RTOL, atol=ATOL), jnp.zeros(N), weight
    ).value


def levenberg_marquardt(weight, y):
    def fn(x, weight):
        return weight @ x + 0.1 * x**3 - y

    solver = optx.LevenbergMarquardt(rtol=RTOL, atol=ATOL)
    return optx.least_squares(fn, solver, jnp.zeros(N), weight).value


# BFGS runs the same machinery as Newton (the walked `fn`, optimistix's implicit
# adjoint): in `make test-all` only.
PROGRAMS = [
    gmres,
    newton,
    pytest.param(bfgs, marks=pytest.mark.slow),
    levenberg_marquardt,
]


def _losses(program):
    def lora_loss(lora, y):
        return jnp.sum(quax.quaxify(program)(lora, y) ** 2)

    def dense_loss(lora, y):
        return jnp.sum(program(quax.lora.merge(lora), y) ** 2)

    return lora_loss, dense_loss


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: getattr(p, "__name__", ""))
def test_value_and_gradients_match_merged_dense(program):
    lora, y = _lora(), jnp.arange(1.0, N + 1)
    lora_loss, dense_loss = _losses(program)
    out = quax.quaxify(program)(lora, y)
    expected = program(quax.lora.merge(lora), y)
    assert jnp.allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Gradients with respect to the adapters and to `y`, in one jitted call each.
    grads = eqx.filter_jit(jax.grad(lora_loss, argnums=(0, 1)))(lora, y)
    dense_grads = eqx.filter_jit(jax.grad(dense_loss, argnums=(0, 1)))(lora, y)
    (g_lora, g_y), (d_lora, d_y) = grads, dense_grads
    assert jnp.any(g_lora.a != 0) and jnp.any(g_lora.b != 0) and jnp.any(g_y != 0)
    assert tree_allclose((g_lora.a, g_lora.b, g_y), (d_lora.a, d_lora.b, d_y))


@pytest.mark.slow
def test_vmap_over_the_right_hand_side():
    lora = _lora()
    ys = jnp.stack([jnp.arange(1.0, N + 1), -jnp.ones(N), jnp.linspace(0.0, 1.0, N)])
    got = jax.vmap(quax.quaxify(gmres), in_axes=(None, 0))(lora, ys)
    expected = jax.vmap(gmres, in_axes=(None, 0))(quax.lora.merge(lora), ys)
    assert jnp.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_error_if_on_a_lora_weight():
    # `eqx.error_if` is a custom_jvp around a `cond` (an error callback in one
    # branch): the weight passes through as a LoRA weight, with its gradient.
    def program(weight, x):
        weight = eqx.error_if(weight, jnp.any(x < -100.0), "x out of range")
        return weight @ x

    lora, x = _lora(), jnp.arange(1.0, N + 1)
    lora_loss, dense_loss = _losses(program)
    assert jnp.allclose(
        quax.quaxify(program)(lora, x), program(quax.lora.merge(lora), x), rtol=1e-5
    )
    g, e = jax.grad(lora_loss)(lora, x), jax.grad(dense_loss)(lora, x)
    assert tree_allclose((g.a, g.b), (e.a, e.b))


def _matrix_gmres(weight, y):
    operator = lx.MatrixLinearOperator(weight)
    return lx.linear_solve(operator, y, lx.GMRES(rtol=RTOL, atol=ATOL)).value


def test_value_used_directly_by_lineax_is_materialised_or_explained():
    # A `MatrixLinearOperator` holding the weight: lineax's own rules multiply by
    # it, outside any function quax can walk.
    y = jnp.arange(1.0, N + 1)
    allowed = _lora(allow_materialise=True)
    got = quax.quaxify(_matrix_gmres)(allowed, y)
    expected = _matrix_gmres(quax.lora.merge(allowed), y)
    assert jnp.allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(_matrix_gmres)(_lora(), y)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "FunctionLinearOperator" in notes and "used the value directly" in notes
