"""Quantities with units (`quax.units`): units are checked and combined while tracing,
and the numbers equal the same program on plain arrays (in SI units)."""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import quax
from quax.units import J, N, Unit, UnitError, Unitful, kg, km, m, s


def _numbers(tree):
    return jtu.tree_map(
        lambda x: x.array if isinstance(x, Unitful) else x,
        tree,
        is_leaf=lambda x: isinstance(x, Unitful),
    )


def _units(tree):
    return jtu.tree_map(
        lambda x: x.unit if isinstance(x, Unitful) else None,
        tree,
        is_leaf=lambda x: isinstance(x, Unitful),
    )


def _scalar(tree):
    return sum(jnp.sum(x) for x in jtu.tree_leaves(_numbers(tree)) if x.dtype != bool)


def run(fn, args, mode, quaxed):
    """`fn` (quaxified or on plain arrays) in `mode`; the last argument is the plain
    float that "grad" differentiates."""
    call = quax.quaxify(fn) if quaxed else fn
    if mode == "eager":
        return _numbers(call(*args))
    if mode == "jit":
        return _numbers(jax.jit(call)(*args))
    if mode == "grad":
        return jax.jit(jax.grad(lambda a: _scalar(call(*args[:-1], a))))(args[-1])
    if mode == "vmap":
        stacked = jtu.tree_map(lambda x: jnp.stack([x, 2 * x]), args)
        return _numbers(jax.jit(jax.vmap(call))(*stacked))
    raise ValueError(mode)


def assert_matches_plain(fn, *args, mode, expected_units=None):
    """`quaxify(fn)` on quantities gives the numbers `fn` gives on their arrays (all
    inputs are in SI units), and the expected units."""
    got = run(fn, args, mode, quaxed=True)
    want = run(fn, _numbers(args), mode, quaxed=False)
    for x, y in zip(jtu.tree_leaves(got), jtu.tree_leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    if expected_units is not None:
        assert _units(quax.quaxify(fn)(*args)) == expected_units


def kinetics(x, t, mass, a):
    v = a * x / t  # m/s
    energy = 0.5 * mass * v**2  # J
    total = jnp.sum(energy)
    share = jnp.max(energy) / total  # dimensionless: a plain array
    fast = jnp.where(v > jnp.mean(v), v, 0.0 * v)
    norm = jnp.sqrt(jnp.sum(v * v))
    return total, share, fast, norm, jnp.cumsum(x)[::2], x.T @ x


@pytest.mark.parametrize("mode", ["eager", "jit", "grad", "vmap"])
def test_program_matches_plain(mode, getkey):
    x = Unitful(jr.normal(getkey(), (4,)), m)
    t = Unitful(jr.uniform(getkey(), (4,), minval=1.0, maxval=2.0), s)
    mass = Unitful(jnp.asarray(2.0), kg)
    units = (J, None, m / s, m / s, m, m**2)
    assert_matches_plain(
        kinetics, x, t, mass, jnp.asarray(1.5), mode=mode, expected_units=units
    )


def dynamics(x0, v0, forces, mass, dt, a):
    """A carry of quantities through scan, quantities as xs and ys, cond, while."""

    def step(carry, f):
        x, v = carry
        v = v + a * f / mass * dt
        x = x + v * dt
        return (x, v), x

    (x, v), path = lax.scan(step, (x0, v0), forces)
    x = lax.cond(jnp.sum(v > v0) > 0, lambda y: y * 2.0, lambda y: -y, x)

    def body(c):
        i, y = c
        return i + 1, y * 0.5

    n = jnp.sum(path[-1] > x0).astype(jnp.int32) + 1  # a traced bound
    _, y = lax.while_loop(lambda c: c[0] < n, body, (0, x))
    return x, v, path, y


@pytest.mark.parametrize("mode", ["eager", "jit", "grad", "vmap"])
def test_control_flow_matches_plain(mode, getkey):
    x0 = Unitful(jr.normal(getkey(), (2,)), m)
    v0 = Unitful(jr.normal(getkey(), (2,)), m / s)
    forces = Unitful(jr.normal(getkey(), (5, 2)), N)
    mass = Unitful(jnp.asarray(3.0), kg)
    dt = Unitful(jnp.asarray(0.1), s)

    def fn(*args):
        out = dynamics(*args)
        # Reverse mode cannot cross the while loop: its output is dropped.
        return out[:3] if mode == "grad" else out

    units = (m, m / s, m, m)[: 3 if mode == "grad" else 4]
    assert_matches_plain(
        fn, x0, v0, forces, mass, dt, jnp.asarray(0.5), mode=mode, expected_units=units
    )


def test_linalg(getkey):
    a = jr.normal(getkey(), (3, 3))
    a = a @ a.T + 3 * jnp.eye(3)
    b = jr.normal(getkey(), (3,))
    qa, qb = Unitful(a, N / m), Unitful(b, N)
    solve = quax.quaxify(jnp.linalg.solve)(qa, qb)
    assert solve.unit == m
    np.testing.assert_allclose(solve.array, jnp.linalg.solve(a, b), rtol=1e-5)
    inv = quax.quaxify(jnp.linalg.inv)(qa)
    assert inv.unit == m / N
    np.testing.assert_allclose(inv.array, jnp.linalg.inv(a), rtol=1e-4, atol=1e-6)
    norm = quax.quaxify(jnp.linalg.norm)(qb)
    assert norm.unit == N
    np.testing.assert_allclose(norm.array, jnp.linalg.norm(b), rtol=1e-6)
    chol = quax.quaxify(jnp.linalg.cholesky)(qa)
    assert chol.unit == (N / m) ** 0.5
    np.testing.assert_allclose(chol.array, jnp.linalg.cholesky(a), rtol=1e-5)
    w = quax.quaxify(jnp.linalg.eigvalsh)(qa)
    assert w.unit == N / m
    np.testing.assert_allclose(w.array, jnp.linalg.eigvalsh(a), rtol=1e-5)


def test_conversion_and_compatible_units():
    d = Unitful(jnp.asarray([1.0, 2.0]), km)
    assert float((Unitful(jnp.asarray(3.0), km)).to_value(m)) == 3000.0
    out = quax.quaxify(jnp.add)(d, Unitful(jnp.asarray([1.0, 1.0]), m))
    assert out.unit == km
    np.testing.assert_allclose(out.array, [1.001, 2.001])
    ratio = quax.quaxify(jnp.divide)(d, Unitful(jnp.asarray([500.0, 500.0]), m))
    assert not isinstance(ratio, Unitful)  # dimensionless: a plain array
    np.testing.assert_allclose(ratio, [2.0, 4.0])
    bigger = quax.quaxify(jnp.greater)(d, Unitful(jnp.asarray([999.0, 2001.0]), m))
    assert bigger.tolist() == [True, False]
    assert N == kg * m / s**2 and J == N * m
    assert Unit("km", m, 1000) == km and (km / m).dimensionless


def test_quax_library_constructor():
    x = Unitful(jnp.asarray(2.0), {m: 1, s: -2})
    assert x.unit == m / s**2
    assert x.units == {m: 1, s: -2}


def test_errors_name_both_units():
    x, t = Unitful(jnp.ones(3), m), Unitful(jnp.ones(3), s)
    with pytest.raises(UnitError, match=r"add.*m and s"):
        quax.quaxify(jnp.add)(x, t)
    with pytest.raises(UnitError, match=r"select_n.*compatible units"):
        quax.quaxify(lambda p, a, b: jnp.where(p, a, b))(jnp.ones(3, bool), x, t)
    with pytest.raises(UnitError, match=r"lt.*plain"):
        quax.quaxify(lambda a: a < 1.0)(x)
    with pytest.raises(quax.NoHandlerError, match=r"exp.*Unitful"):
        quax.quaxify(jnp.exp)(x)
    with pytest.raises(UnitError, match=r"concrete scalar"):
        quax.quaxify(lambda a, p: a**p)(x, jnp.asarray(2.0))
    # Zero, inf and nan are the same in every unit.
    relu = quax.quaxify(lambda a: jnp.maximum(a, 0.0))(x)
    assert relu.unit == m


def test_non_finite_powers():
    # `(1 m) ** inf` is not any power of metres (found by the fuzzer: it raised a bare
    # OverflowError from `fractions`); a pure number's unit is kept.
    x = Unitful(jnp.asarray([0.5, 2.0]), m)
    for p in (jnp.inf, -jnp.inf, jnp.nan):
        with pytest.raises(UnitError, match=r"non-finite power"):
            quax.quaxify(lambda a, p=p: a**p)(x)
    pure = m / m
    assert pure**jnp.inf == pure
    with pytest.raises(UnitError, match=r"non-finite power"):
        _ = km**jnp.nan


def test_truth_of_a_quantity_is_plain():
    # Whether an entry is nonzero is the same in every unit: `astype(bool)`,
    # `jnp.any`, `jnp.all` of a quantity are plain arrays (found by the fuzzer).
    x = jnp.asarray([[0.0, 2.0], [-1.0, 0.0]])
    q = Unitful(x, km)
    fns = (
        lambda a: a.astype(bool),
        jnp.any,
        lambda a: jnp.all(a, axis=1),
        lambda a: a.astype(jnp.int32),
    )
    for fn in fns:
        got = quax.quaxify(fn)(q)
        expected = fn(x)
        if expected.dtype == jnp.bool_:
            assert not isinstance(got, Unitful)
            assert got.tolist() == expected.tolist()
        else:
            assert got.unit == km and got.array.tolist() == expected.tolist()
