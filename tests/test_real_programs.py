"""Real programs on other libraries, run at a small size against the same program on
dense arrays (issue 12): diffrax neural ODEs with every adjoint, lineax and optimistix
solvers, and values closed over by the function given to `quaxify`."""

import importlib.util
import pathlib

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import tree_allclose

import quax


@pytest.fixture(autouse=True)
def _no_tracer_leak_check():
    """JAX 0.10.2's leak checker crashes (IndexError in `_why_alive`) on any jitted
    `diffrax.diffeqsolve`, with or without quax (`JAX_CHECK_TRACER_LEAKS=1 python -c
    "...eqx.filter_jit(diffeqsolve)..."`), so this module runs without it."""
    with jax.check_tracer_leaks(False):
        yield


def _load_example(name: str):
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- diffrax: gradients through custom_vjp (issue 12.1) --------------------------------


@pytest.mark.parametrize(
    "adjoint",
    [
        "recursive_checkpoint",
        pytest.param("backsolve", marks=pytest.mark.slow),
        pytest.param("direct", marks=pytest.mark.slow),
    ],
)
def test_neural_ode_lora_finetune_matches_merged_dense(adjoint):
    example = _load_example("neural_ode")
    out = example.train(adjoint, steps=2, width=8, depth=1, n=2, solver=diffrax.Euler())
    # Every step's LoRA gradient equals the merged dense model's, and so do the losses.
    assert max(out["grad_diffs"]) < 1e-5
    assert jnp.allclose(
        jnp.array(out["losses"]), jnp.array(out["dense_losses"]), rtol=1e-5
    )
    assert out["losses"][-1] < out["losses"][0]


def _ode_loss(model, y0):
    term = diffrax.ODETerm(lambda t, y, model: model(y))
    sol = diffrax.diffeqsolve(
        term,
        diffrax.Euler(),
        0.0,
        1.0,
        0.25,
        y0,
        args=model,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 3)),
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys**2)


def test_grad_of_y0_only_with_default_lora():
    # Only `y0` is differentiated: the LoRA weights (which refuse to materialise)
    # arrive unperturbed at every custom_vjp and are never materialised.
    mlp = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jr.key(0))
    model = quax.lora.loraify(mlp, rank=2, key=jr.key(1))
    y0 = jnp.array([1.0, -0.5])
    got = jax.jit(jax.grad(lambda y0: quax.quaxify(_ode_loss)(model, y0)))(y0)
    expected = jax.grad(lambda y0: _ode_loss(quax.lora.merge(model), y0))(y0)
    assert tree_allclose(got, expected)


# -- values closed over (issue 12.3) ---------------------------------------------------


def _lora_mlp():
    mlp = eqx.nn.MLP(3, 2, 8, 1, key=jr.key(0))
    model = quax.lora.loraify(mlp, rank=2, key=jr.key(1))
    # Nonzero `b`, so the adapters change the output.
    return eqx.tree_at(
        lambda m: [layer.weight.b for layer in m.layers],
        model,
        replace_fn=lambda b: jnp.full(b.shape, 0.3),
    )


def test_equinox_module_closed_over():
    model = _lora_mlp()
    x = jnp.array([1.0, -2.0, 0.5])
    merged = quax.lora.merge(model)
    assert tree_allclose(quax.quaxify(lambda x: model(x))(x), merged(x))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(quax.quaxify(lambda x: model(x))(x))))
    assert tree_allclose(grad(x), jax.grad(lambda x: jnp.sum(merged(x)))(x))


def test_partial_and_nested_closure():
    import functools as ft

    model = _lora_mlp()
    x = jnp.array([1.0, -2.0, 0.5])
    inner = lambda x: model(x)
    outer = ft.partial(lambda scale, x: scale * inner(x), 2.0)
    assert tree_allclose(quax.quaxify(outer)(x), 2.0 * quax.lora.merge(model)(x))


def test_flax_nnx_module_closed_over():
    import flax.nnx as nnx

    linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    lora = quax.lora.LoraArray(linear.kernel[...], rank=2, key=jr.key(2))
    lora = eqx.tree_at(lambda lo: lo.b, lora, jnp.ones_like(lora.b))
    linear.kernel = nnx.Param(lora)
    dense = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    dense.kernel = nnx.Param(lora.w + lora.a @ lora.b)
    x = jnp.array([1.0, -2.0, 0.5])
    assert tree_allclose(quax.quaxify(lambda x: linear(x))(x), dense(x))
    assert tree_allclose(quax.quaxify(linear.__call__)(x), dense(x))
    got = jax.grad(lambda x: jnp.sum(quax.quaxify(lambda x: linear(x))(x)))(x)
    assert tree_allclose(got, jax.grad(lambda x: jnp.sum(dense(x)))(x))
