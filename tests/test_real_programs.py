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


@pytest.mark.parametrize("adjoint", ["recursive_checkpoint", "backsolve", "direct"])
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
