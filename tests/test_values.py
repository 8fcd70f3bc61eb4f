"""`Value`/`ArrayValue`: abstract methods, properties and Python operators."""

import operator

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import pytest
from builders import Ruleless, Scaled

import quax


x = jnp.arange(1.0, 7.0).reshape(2, 3)
v = Ruleless(x)


def test_abstract_methods_are_required():
    class Incomplete(quax.ArrayValue):
        array: jax.Array

        def aval(self):
            return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    with pytest.raises(TypeError):
        Incomplete(x)  # pyright: ignore[reportAbstractUsage]


def test_shape_dtype_ndim_size_len():
    assert v.shape == (2, 3)
    assert v.dtype == jnp.float32
    assert v.ndim == 2
    assert v.size == 6
    assert len(v) == 2


@pytest.mark.parametrize(
    "op",
    [
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
    ],
)
def test_binary_operators_both_sides(op):
    y = jnp.full((2, 3), 2.0)
    np.testing.assert_allclose(op(v, y), op(x, y), rtol=1e-6)
    np.testing.assert_allclose(op(y, v), op(y, x), rtol=1e-6)
    np.testing.assert_allclose(op(v, 2.0), op(x, 2.0), rtol=1e-6)
    np.testing.assert_allclose(op(2.0, v), op(2.0, x), rtol=1e-6)


def test_numpy_array_on_the_left_defers_to_the_value():
    y = np.full((2, 3), 2.0, dtype=np.float32)
    out = y + v
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(out, y + np.asarray(x))


def test_matmul_both_sides():
    y = jnp.ones((3, 4))
    np.testing.assert_allclose(v @ y, x @ y)
    np.testing.assert_allclose(y.T @ v.T, y.T @ x.T)


def test_integer_operators():
    i = Ruleless(jnp.arange(6, dtype=jnp.int32))
    dense = jnp.arange(6, dtype=jnp.int32)
    for op in (
        operator.and_,
        operator.or_,
        operator.xor,
        operator.lshift,
        operator.rshift,
    ):
        np.testing.assert_array_equal(op(i, 1), op(dense, 1))
    np.testing.assert_array_equal(~i, ~dense)


def test_unary_operators_indexing_and_transpose():
    np.testing.assert_allclose(-v, -x)
    assert isinstance(+v, Ruleless)  # jnp.positive is the identity: the value itself
    np.testing.assert_allclose((+v).materialise(), x)
    np.testing.assert_allclose(abs(Ruleless(-x)), x)
    np.testing.assert_allclose(v[1], x[1])
    np.testing.assert_allclose(v[:, 1:], x[:, 1:])
    np.testing.assert_allclose(v[jnp.array([1, 0])], x[jnp.array([1, 0])])
    np.testing.assert_allclose(v.T, x.T)


def test_operators_keep_values_when_a_handler_does():
    s = Scaled(x, jnp.asarray(3.0))
    out = s * 2.0
    assert isinstance(out, Scaled)
    np.testing.assert_allclose(out.materialise(), 6.0 * x)
    out = 2.0 * s
    assert isinstance(out, Scaled)
    out = -s
    assert isinstance(out, Scaled)
    np.testing.assert_allclose(out.materialise(), -3.0 * x)


def test_equality_is_module_equality():
    assert v == v
    assert not (v == Ruleless(x + 1))
    assert not (v != v)
    np.testing.assert_array_equal(quax.quaxify(jnp.equal)(v, x), jnp.ones((2, 3), bool))


def test_operators_return_not_implemented_for_unknown_types():
    with pytest.raises(TypeError):
        _ = v + "a"  # pyright: ignore[reportOperatorIssue]
    with pytest.raises(TypeError):
        _ = object() * v  # pyright: ignore[reportOperatorIssue]


def test_operators_under_jit_and_grad():
    f = eqx.filter_jit(lambda v, y: (v * y + 1.0) @ y.T)
    y = jnp.ones((2, 3))
    np.testing.assert_allclose(f(v, y), (x * y + 1.0) @ y.T)
    g = jax.grad(lambda y: jnp.sum(v * y))(y)
    np.testing.assert_allclose(g, x)


def test_values_are_pytrees():
    leaves = jax.tree_util.tree_leaves(Scaled(x, jnp.asarray(2.0)))
    assert len(leaves) == 2
