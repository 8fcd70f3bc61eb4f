"""`quax.sparse.BCOO` against the same computation on `todense()`, in every mode.

Values are built with `allow_materialise=False`, so a rule that fell back to
densifying would raise instead of passing."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import walked
from jax.experimental import sparse as jsparse

import quax
from quax.sparse import BCOO


MODES = ("eager", "jit", "grad", "vmap")


def random_dense(key, shape, density=0.4):
    k1, k2 = jr.split(key)
    return jr.normal(k1, shape) * (jr.uniform(k2, shape) < density)


def todense(x):
    return x.todense() if isinstance(x, BCOO) else x


def _ravel_all(out):
    """Every output (sparse ones densified), raveled and joined."""
    out = out if isinstance(out, tuple) else (out,)
    return jnp.concatenate([jnp.ravel(todense(o)) for o in out])


def check(fn, sp: BCOO, *rest, mode: str, atol=1e-5):
    """`quaxify(fn)(sp, *rest)` equals `fn(sp.todense(), *rest)` in `mode`; grad and
    vmap are taken with respect to `sp.data`."""

    def sparse_fn(data):
        value = BCOO(data, sp.indices, sp.shape, allow_materialise=False)
        return _ravel_all(quax.quaxify(fn)(value, *rest))

    def dense_fn(data):
        return _ravel_all(fn(BCOO(data, sp.indices, sp.shape).todense(), *rest))

    if mode == "eager":
        got, expected = sparse_fn(sp.data), dense_fn(sp.data)
    elif mode == "jit":
        got, expected = jax.jit(sparse_fn)(sp.data), dense_fn(sp.data)
    elif mode == "grad":

        def scalar(f):
            return lambda d: jnp.sum(jnp.sin(f(d)))

        got = jax.jit(jax.grad(scalar(sparse_fn)))(sp.data)
        expected = jax.grad(scalar(dense_fn))(sp.data)
    else:
        data = jnp.stack([sp.data, 2.0 * sp.data])
        got = jax.jit(jax.vmap(sparse_fn))(data)
        expected = jax.vmap(dense_fn)(data)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol)
    return got


@pytest.fixture(scope="module")
def mats():
    key = jr.key(0)
    k1, k2, k3, k4 = jr.split(key, 4)
    m = random_dense(k1, (5, 6))
    batched = random_dense(k2, (3, 5, 6))
    return {
        "plain": BCOO.fromdense(m),
        "batched": BCOO.fromdense(batched, n_batch=1),
        "dense_dim": BCOO.fromdense(batched, n_dense=1),
        "x": jr.normal(k3, (6, 4)),
        "v": jr.normal(k4, (5,)),
        "full": jr.normal(k4, (3, 5, 6)),
    }


# -- construction -----------------------------------------------------------------


def test_fromdense_todense_roundtrip(getkey):
    m = random_dense(getkey(), (2, 4, 5, 3))
    for n_batch, n_dense in [(0, 0), (1, 1), (2, 0)]:
        sp = BCOO.fromdense(m, n_batch=n_batch, n_dense=n_dense)
        assert (sp.n_batch, sp.n_dense) == (n_batch, n_dense)
        np.testing.assert_array_equal(sp.todense(), m)


def test_layout_matches_jax_experimental_sparse(getkey):
    m = random_dense(getkey(), (3, 4, 5))
    ours = BCOO.fromdense(m, n_batch=1)
    theirs = jsparse.BCOO.fromdense(m, n_batch=1)
    assert ours.data.shape == theirs.data.shape
    assert ours.indices.shape == theirs.indices.shape
    np.testing.assert_array_equal(
        BCOO(theirs.data, theirs.indices, m.shape).todense(), m
    )


def test_duplicates_add_and_padding_is_ignored():
    data = jnp.array([1.0, 2.0, 5.0, 7.0])
    indices = jnp.array([[0, 1], [0, 1], [2, 3], [3, 0]])  # last: row 3 of 3 rows
    sp = BCOO(data, indices, (3, 4))
    expected = jnp.zeros((3, 4)).at[0, 1].set(3.0).at[2, 3].set(5.0)
    np.testing.assert_array_equal(sp.todense(), expected)
    np.testing.assert_array_equal(sp.sum_duplicates().todense(), expected)
    out = quax.quaxify(lambda a: a.max(1))(sp)
    np.testing.assert_array_equal(out, jnp.array([3.0, 0.0, 5.0]))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="expects `data` of shape"):
        BCOO(jnp.ones(3), jnp.zeros((4, 2), jnp.int32), (5, 5))
    with pytest.raises(ValueError, match="integer `indices`"):
        BCOO(jnp.ones(3), jnp.zeros((3, 2)), (5, 5))


def test_refuses_to_materialise_by_default(mats):
    with pytest.raises(quax.NoHandlerError, match="(?s)`exp`.*BCOO.*allow_materialise"):
        quax.quaxify(jnp.exp)(mats["plain"])
    allowed = BCOO(mats["plain"].data, mats["plain"].indices, (5, 6), True)
    out = quax.quaxify(jnp.exp)(allowed)
    np.testing.assert_allclose(out, jnp.exp(mats["plain"].todense()))


# -- every rule, in every mode ----------------------------------------------------


# Each group is one compiled function (compiles dominate the run time).
PLAIN_GROUPS = {
    "linear_algebra": lambda a, x, v: (
        a @ x,
        v @ a,
        jnp.einsum("ij,jk->ki", a, x),
        a @ a.T,
        -a.T @ x[:5, :],
    ),
    "elementwise": lambda a, x, v: (
        2.0 * (a / 4.0),
        a * jnp.cos(x[:, :1].T),
        a + a * 3.0 - a,
        (a + 1.0) - jnp.ones((5, 6)),
        a.astype(jnp.float16).astype(jnp.float32),
    ),
    "shape_reduction": lambda a, x, v: (
        a.sum(0),
        a.sum(1),
        a.sum(),
        a.max(0),
        a.min(1),
        a[1:4],
        a[:, ::2],
        a[2],
        a[:, 3],
        a.reshape(3, 10),
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group", sorted(PLAIN_GROUPS))
def test_plain(mats, mode, group):
    fn = PLAIN_GROUPS[group]
    atol = 1e-2 if group == "elementwise" else 1e-5  # float16 round trip

    check(lambda a: fn(a, mats["x"], mats["v"]), mats["plain"], mode=mode, atol=atol)


def _dense_dim_ops(a, x, full):
    """`a` has sparse dims (3, 5) and a dense dim 6."""
    return (
        a @ x,
        jnp.transpose(a, (1, 0, 2)) @ x,
        (a * full) + a,
        a.sum(0),
        a.sum((0, 2)),
        a.sum(1),
        a[1],
        a[1:2, 2:4],
    )


def _batched_ops(a, x, full):
    """`a` has a batch dim 3 and sparse dims (5, 6)."""
    return (
        a @ x,
        a @ jnp.stack([x, x, x]),
        x[:, :1].T @ jnp.swapaxes(a, 1, 2),
        (a * full) + a,
        a.sum(0),
        a.sum((0, 2)),
        a.sum(1),
        a[1],
        a.reshape(3, 1, 5, 6),
    )


@pytest.mark.parametrize("mode", ("jit", "grad"))
@pytest.mark.parametrize("layout", ["batched", "dense_dim"])
def test_batch_and_dense_dims(mats, mode, layout):
    ops = _batched_ops if layout == "batched" else _dense_dim_ops
    check(lambda a: ops(a, mats["x"], mats["full"]), mats[layout], mode=mode)


def test_dynamic_index(mats):
    def f(a, i):
        return a[i] @ mats["x"]

    sp = mats["plain"]
    for i in (0, 3, 4):
        got = jax.jit(quax.quaxify(f))(sp, jnp.int32(i))
        np.testing.assert_allclose(got, sp.todense()[i] @ mats["x"], rtol=1e-6)


def test_results_stay_sparse(mats):
    sp = mats["plain"]
    for fn in (lambda a: 2.0 * a, lambda a: a + a, lambda a: a.T, lambda a: a[1:3]):
        assert isinstance(quax.quaxify(fn)(sp), BCOO)
    assert isinstance(quax.quaxify(lambda a: a @ a.T)(sp), BCOO)


def test_matmul_never_forms_the_dense_matrix():
    n = 512
    m = random_dense(jr.key(1), (n, n), density=0.01)
    sp = BCOO.fromdense(m)
    jaxpr = walked(
        jax.make_jaxpr(quax.quaxify(lambda a, x: a @ x))(sp, jnp.ones((n, 3)))
    )
    shapes = {tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars}
    assert (n, n) not in shapes


def test_precision_and_preferred_element_type(mats):
    sp = mats["plain"]
    x = mats["x"]

    def f(a, x):
        return jax.lax.dot_general(
            a,
            x,
            (((1,), (0,)), ((), ())),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    np.testing.assert_allclose(quax.quaxify(f)(sp, x), f(sp.todense(), x), rtol=1e-6)
    ints = BCOO(sp.data.astype(jnp.int8), sp.indices, sp.shape)

    def g(a, x):
        return jax.lax.dot(a, x, preferred_element_type=jnp.int32)

    xi = (x * 10).astype(jnp.int8)
    got = quax.quaxify(g)(ints, xi)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, g(ints.todense(), xi))


# -- control flow -----------------------------------------------------------------


def test_scan_over_a_stack_of_sparse_matrices(mats):
    stack = mats["batched"]  # (3, 5, 6), one sparse matrix per step
    x = mats["x"]

    def f(stack, x):
        def body(c, a):
            return c + jnp.sum(a @ x), a * 2.0

        return jax.lax.scan(body, jnp.zeros(()), stack)

    # `stack` refuses to materialise: the scan slices and stacks it with the
    # `unstack`/`stack` hooks, so the body runs the sparse rules.
    carry, ys = quax.quaxify(f)(stack, x)
    assert isinstance(ys, BCOO) and ys.shape == stack.shape
    exp_carry, exp_ys = f(stack.todense(), x)
    np.testing.assert_allclose(carry, exp_carry, rtol=1e-5)
    np.testing.assert_allclose(todense(ys), exp_ys, rtol=1e-5)


def test_sparse_carry_cond_and_while(mats):
    sp = mats["plain"]
    x = mats["x"]

    def scan_carry(a):
        def body(c, _):
            return c * 0.5, jnp.sum(c @ x)

        c, ys = jax.lax.scan(body, a, length=3)
        return c, ys

    def cond(a, p):
        return jax.lax.cond(p, lambda a: a * 2.0, lambda a: -a, a)

    def while_(a):
        return jax.lax.while_loop(
            lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0), (0, a)
        )[1]

    c, ys = jax.jit(quax.quaxify(scan_carry))(sp)
    exp_c, exp_ys = scan_carry(sp.todense())
    assert isinstance(c, BCOO)
    np.testing.assert_allclose(c.todense(), exp_c)
    np.testing.assert_allclose(ys, exp_ys, rtol=1e-5)
    for p in (True, False):
        out = quax.quaxify(cond)(sp, p)
        assert isinstance(out, BCOO)
        np.testing.assert_allclose(out.todense(), cond(sp.todense(), p))
    out = quax.quaxify(while_)(sp)
    assert isinstance(out, BCOO)
    np.testing.assert_allclose(out.todense(), while_(sp.todense()))
