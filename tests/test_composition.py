"""Composition: JAX transformations applied outside `quaxify` and inside the
quaxified function, for a rule-less type, a type whose handlers return values, and a
nested value. Every cell is compared against the dense program (issue 3)."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from builders import BUILDERS
from helpers import densify

import quax


KINDS = ("ruleless", "scaled", "nested")
TRANSFORMS = ("jit", "grad", "value_and_grad", "vmap", "jvp", "vjp", "checkpoint")


def f(x, y):
    """Scaled keeps its type through `* 2.0` and `-`; `sin` materialises."""
    return jnp.sum(jnp.sin(-(x * 2.0)) * y)


def _ones_like(tree):
    return jtu.tree_map(jnp.ones_like, tree)


def _stack(tree):
    return jtu.tree_map(lambda leaf: jnp.stack([leaf, 0.5 * leaf]), tree)


def _outside(transform, g, x, y):
    """`transform` applied to `g(x, y)`, where `x` may be a value (a pytree)."""
    if transform == "jit":
        return jax.jit(g)(x, y)
    if transform == "grad":
        return jax.grad(g, argnums=(0, 1))(x, y)
    if transform == "value_and_grad":
        return jax.value_and_grad(g, argnums=(0, 1))(x, y)
    if transform == "vmap":
        return jax.vmap(g)(_stack(x), _stack(y))
    if transform == "jvp":
        return jax.jvp(g, (x, y), (_ones_like(x), _ones_like(y)))
    if transform == "vjp":
        out, pull = jax.vjp(g, x, y)
        return out, pull(jnp.asarray(1.5))
    if transform == "checkpoint":
        return jax.checkpoint(g)(x, y), jax.grad(jax.checkpoint(g), argnums=1)(x, y)
    raise ValueError(transform)


def _inside(transform):
    """A function of (x, y) that applies `transform` to `f` on arrays."""
    if transform == "vmap":
        return lambda x, y: jax.vmap(f)(x, y)  # maps over the rows
    return lambda x, y: _outside(transform, f, x, y)


def _assert_leaves_close(got, expected):
    got_leaves, got_def = jtu.tree_flatten(got)
    exp_leaves, exp_def = jtu.tree_flatten(expected)
    assert got_def == exp_def, (got_def, exp_def)
    for a, b in zip(got_leaves, exp_leaves, strict=True):
        assert np.shape(a) == np.shape(b)
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transform_outside_quaxify(transform, kind, getkey):
    value, _ = BUILDERS[kind](getkey())
    y = jnp.linspace(0.0, 1.0, value.size).reshape(value.shape)
    # Derivatives with respect to a value are with respect to its leaves; the dense
    # program computes them through `materialise()`.
    # Each cell is compiled whole (one XLA compile instead of one per eager op).
    got = jax.jit(lambda x, y: _outside(transform, quax.quaxify(f), x, y))(value, y)
    dense_f = lambda x, y: f(densify(x), y)
    expected = jax.jit(lambda x, y: _outside(transform, dense_f, x, y))(value, y)
    _assert_leaves_close(got, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transform_inside_quaxify(transform, kind, getkey):
    value, _ = BUILDERS[kind](getkey())
    y = jnp.linspace(0.0, 1.0, value.size).reshape(value.shape)
    fn = _inside(transform)
    got = jax.jit(quax.quaxify(fn))(value, y)
    expected = jax.jit(fn)(densify(value), y)
    _assert_leaves_close(densify(got), expected)
