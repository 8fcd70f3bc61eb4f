"""`quax.structured` matrices against the same computation on `materialise()`."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import assert_matches_dense, densify, walked

import quax
from quax.structured import Diagonal, Identity, Kronecker, TridiagonalMatrix, solve


N = 6


def make_tridiagonal(key) -> TridiagonalMatrix:
    k1, k2, k3 = jr.split(key, 3)
    d, lo, up = (
        jr.normal(k1, (N,)) + 4.0,
        jr.normal(k2, (N - 1,)),
        jr.normal(k3, (N - 1,)),
    )
    return TridiagonalMatrix(d, lo, up)


def make(kind: str, key):
    k1, k2, k3 = jr.split(key, 3)
    if kind == "tridiagonal":
        return make_tridiagonal(key)
    if kind == "diagonal":
        return Diagonal(jr.normal(k1, (N,)) + 3.0)
    if kind == "identity":
        return Identity(N, 2.5)
    if kind == "kronecker":
        return Kronecker(jr.normal(k1, (2, 3)), make_tridiagonal(k2))
    raise ValueError(kind)


KINDS = ("tridiagonal", "diagonal", "identity", "kronecker")


def ops(m, x):
    """One compiled function per (type, mode): products on both sides, transposes,
    scalar products, sums."""
    rows, cols = m.shape
    xr = x[:cols]
    return (
        m @ xr,
        xr.T @ m.T,
        m.T @ x[:rows, 0],
        x[:rows, 0] @ m,
        jnp.einsum("ij,jk->ki", m, xr),
        -(2.0 * m) / 4.0,
        m * 3.0 + m if rows == cols else m,
    )


@pytest.mark.parametrize("mode", ("eager", "grad", "vmap"))
@pytest.mark.parametrize("kind", KINDS)
def test_against_dense(kind, mode, getkey):
    m = make(kind, getkey())
    x = jr.normal(getkey(), (3 * N, 4))
    assert_matches_dense(ops, m, x, mode=mode, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_structure_is_kept(kind, getkey):
    m = make(kind, getkey())
    cls = type(m)
    fns = [lambda a: a.T, lambda a: 2.0 * a, lambda a: -a / 3.0]
    fns.append(lambda a: a.astype(jnp.float16))
    if kind != "kronecker":
        fns += [lambda a: a + a, lambda a: a - 2.0 * a, lambda a: a * jnp.ones((N, N))]
    else:
        fns.append(lambda a: a @ a.T)
    for fn in fns:
        out = quax.quaxify(fn)(m)
        # A scaled identity times a dense matrix is diagonal.
        assert isinstance(out, cls | Diagonal if kind == "identity" else cls), kind
        np.testing.assert_allclose(
            densify(out), fn(m.materialise()), rtol=2e-3, atol=2e-3
        )


@pytest.mark.parametrize(
    "fn, cls",
    [
        (lambda t, d, i: t + d, TridiagonalMatrix),
        (lambda t, d, i: d - t, TridiagonalMatrix),
        (lambda t, d, i: t - i, TridiagonalMatrix),
        (lambda t, d, i: d + i, Diagonal),
        (lambda t, d, i: i - d, Diagonal),
        (lambda t, d, i: t @ d, TridiagonalMatrix),
        (lambda t, d, i: d @ t.T, TridiagonalMatrix),
        (lambda t, d, i: i @ t, TridiagonalMatrix),
        (lambda t, d, i: d @ d @ i, Diagonal),
    ],
)
def test_mixed_structure(fn, cls, getkey):
    t, d, i = (
        make_tridiagonal(getkey()),
        make("diagonal", getkey()),
        make("identity", getkey()),
    )
    out = quax.quaxify(fn)(t, d, i)
    assert isinstance(out, cls)
    expected = fn(t.materialise(), d.materialise(), i.materialise())
    np.testing.assert_allclose(out.materialise(), expected, rtol=1e-5, atol=1e-5)


def test_matvec_is_linear_in_n():
    n = 4096
    t = TridiagonalMatrix(jnp.ones(n), jnp.ones(n - 1), jnp.ones(n - 1))
    jaxpr = walked(jax.make_jaxpr(quax.quaxify(lambda t, v: t @ v))(t, jnp.ones(n)))
    sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars]
    assert max(sizes) <= n


def test_linalg_solve_reaches_tridiagonal_solve(getkey):
    t = make_tridiagonal(getkey())
    b = jr.normal(getkey(), (N, 2))
    for rhs in (b, b[:, 0]):
        f = quax.quaxify(jnp.linalg.solve)
        jaxpr = jax.make_jaxpr(f)(t, rhs)
        assert "tridiagonal_solve" in str(jaxpr) and " lu " not in str(jaxpr)
        np.testing.assert_allclose(
            f(t, rhs), jnp.linalg.solve(t.materialise(), rhs), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(solve(t, rhs), f(t, rhs), rtol=1e-5, atol=1e-6)


def test_solve_gradient(getkey):
    t = make_tridiagonal(getkey())
    b = jr.normal(getkey(), (N,))

    def loss(diag, b, dense):
        m = TridiagonalMatrix(diag, t.lower_diagonal, t.upper_diagonal)
        if dense:
            return jnp.sum(jnp.linalg.solve(m.materialise(), b) ** 2)
        return jnp.sum(quax.quaxify(jnp.linalg.solve)(m, b) ** 2)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
        t.diagonal, b, False
    )
    expected = jax.grad(loss, argnums=(0, 1))(t.diagonal, b, True)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    assert np.allclose(solve(Diagonal(t.diagonal), b), b / t.diagonal)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="`lower_diagonal` of shape"):
        TridiagonalMatrix(jnp.ones(4), jnp.ones(4), jnp.ones(3))
    with pytest.raises(ValueError, match="2-D `right`"):
        Kronecker(jnp.ones((2, 2)), jnp.ones(3))


def test_control_flow(getkey):
    t = make_tridiagonal(getkey())
    x = jr.normal(getkey(), (N,))

    def f(t, x, p):
        def body(c, row):
            return 0.5 * c, jnp.sum(c @ x) + jnp.sum(row)

        c, ys = jax.lax.scan(body, t, t)  # t as carry (kept) and as xs (rows)
        c = jax.lax.cond(p, lambda c: -c, lambda c: 2.0 * c, c)
        c = jax.lax.fori_loop(0, jnp.int32(2), lambda i, c: c * 0.5, c)
        return c, ys

    for p in (True, False):
        c, ys = jax.jit(quax.quaxify(f))(t, x, p)
        exp_c, exp_ys = f(t.materialise(), x, p)
        assert isinstance(c, TridiagonalMatrix)
        np.testing.assert_allclose(c.materialise(), exp_c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ys, exp_ys, rtol=1e-5, atol=1e-5)


def test_kronecker_sums_materialise(getkey):
    # A sum of Kronecker products is one only when they share a factor, which quax
    # cannot see while tracing: `add`/`sub` materialise, with the dense numbers.
    a, b, c = (jr.normal(getkey(), (2, 3)) for _ in range(3))
    t = make_tridiagonal(getkey())

    def sums(a, b, c, t):
        ka = Kronecker(a, t)
        return ka + Kronecker(a, t * 2.0), Kronecker(b, t) - ka, ka + Kronecker(c, t)

    dense = t.materialise()
    expected = (
        3.0 * jnp.kron(a, dense),
        jnp.kron(b, dense) - jnp.kron(a, dense),
        jnp.kron(a, dense) + jnp.kron(c, dense),
    )
    for run in (quax.quaxify(sums), jax.jit(quax.quaxify(sums))):
        for got, want in zip(run(a, b, c, t), expected, strict=True):
            assert not isinstance(got, Kronecker)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
