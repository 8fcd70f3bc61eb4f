"""`quax.examples.*`: the Quax library's example names and constructors."""

import importlib

import jax
import jax.numpy as jnp
import pytest

import quax
from quax.examples import named, prng, unitful


def test_named():
    a, b = named.Axis(3), named.Axis(None)
    x = named.NamedArray(jnp.ones((3, 2)), (a, b))
    y = named.NamedArray(jnp.ones((2, 4)), (b, named.Axis(4)))
    out = quax.quaxify(jnp.matmul)(x, y)
    assert out.axes[0] is a and out.axes[1] is y.axes[1]
    with pytest.raises(ValueError, match="size 3"):
        named.NamedArray(jnp.ones((2, 2)), (a, b))
    with pytest.raises(quax.NoHandlerError, match="allow_materialise"):
        quax.quaxify(lambda x: x[jnp.array([0])])(x)
    i, j, k = named.Axis(3), named.Axis(None), named.Axis(3)
    cube = named.NamedArray(jnp.arange(18.0).reshape(3, 2, 3), (i, j, k))
    t = named.trace(cube, axis1=i, axis2=k)
    assert t.axes == (j,)
    assert jnp.allclose(t.array, jnp.trace(cube.array, axis1=0, axis2=2))


def test_prng():
    key = prng.ThreeFry(0)
    k1, k2 = prng.split(key)
    assert isinstance(k1, prng.PRNG)
    u = prng.uniform(k1, (3,))
    assert jnp.allclose(
        u, jax.random.uniform(jax.random.split(jax.random.key(0))[0], (3,))
    )
    assert prng.normal(k2, (2,)).shape == (2,)


def test_unitful():
    x = unitful.Unitful(jnp.asarray(2.0), unitful.meters)
    t = unitful.Unitful(jnp.asarray(4.0), {unitful.seconds: 1})
    v = quax.quaxify(lambda x, t: x / t)(x, t)
    assert v.units == {unitful.meters: 1, unitful.seconds: -1}
    assert float(v.array) == 0.5
    assert unitful.Dimension("kg") == unitful.kilograms


@pytest.mark.parametrize(
    "example, backing, name",
    [
        ("sparse", "sparse", "BCOO"),
        ("structured_matrices", "structured", "TridiagonalMatrix"),
    ],
)
def test_sparse_and_structured_reexport(example, backing, name):
    module = importlib.import_module(f"quax.examples.{example}")
    try:
        real = importlib.import_module(f"quax.{backing}")
    except ImportError:
        with pytest.raises(ImportError, match=f"quax.{backing}"):
            getattr(module, name)
    else:
        assert getattr(module, name) is getattr(real, name)
