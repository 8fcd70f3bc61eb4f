"""PRNG keys (`quax.prng.ThreeFry`) against the same programs on JAX's own keys."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from helpers import run_mode, tree_allclose

import quax
from quax.prng import PRNG, ThreeFry, from_key, normal, split, uniform


def _bits(tree):
    """Keys (ours or JAX's) replaced by their raw bits, so outputs compare."""

    def leaf(x):
        if isinstance(x, PRNG):
            return x.data
        if jnp.issubdtype(getattr(x, "dtype", jnp.float32), jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x

    return jtu.tree_map(leaf, tree, is_leaf=lambda x: isinstance(x, PRNG))


def _dense(tree):
    return jtu.tree_map(
        lambda x: x.materialise() if isinstance(x, PRNG) else x,
        tree,
        is_leaf=lambda x: isinstance(x, PRNG),
    )


def assert_same_as_jax_keys(fn, *args, mode="eager"):
    """`quaxify(fn)` on our keys gives what `fn` gives on JAX's keys, in `mode`."""
    argnum = next((i for i, a in enumerate(args) if eqx.is_inexact_array(a)), None)
    got = run_mode(fn, args, mode, quaxed=True, argnum=argnum)
    expected = run_mode(fn, _dense(args), mode, quaxed=False, argnum=argnum)
    assert tree_allclose(_bits(got), _bits(expected)), (got, expected)
    return got


def program(key, mu):
    k1, k2 = jax.random.split(key)
    x = mu * jax.random.normal(k1, (3,))
    k3 = jax.random.fold_in(k2, 7)
    bits = jax.random.bits(k3, (2,))
    k4 = jnp.where(x[0] > 0, k1, k3)
    return x + jax.random.uniform(k4, (3,)), bits, k4, jax.random.key_data(k2)


def test_program_matches_jax_keys(mode):
    assert_same_as_jax_keys(program, ThreeFry(3), jnp.asarray(1.5), mode=mode)


def test_keys_stay_keys():
    out = quax.quaxify(program)(ThreeFry(0), 1.0)
    assert isinstance(out[2], ThreeFry)
    keys = quax.quaxify(lambda k: jax.random.split(k, 5))(ThreeFry(0))
    assert isinstance(keys, ThreeFry) and keys.shape == (5,)
    assert isinstance(keys[1], ThreeFry) and keys[1].shape == ()
    ref = jax.random.split(jax.random.key(0), 5)
    assert jnp.array_equal(keys.data, jax.random.key_data(ref))


def test_seed_and_methods_match_jax():
    key = ThreeFry(42)
    ref = jax.random.key(42)
    assert jnp.array_equal(key.data, jax.random.key_data(ref))
    assert key.shape == () and key.dtype == ref.dtype
    for ours, theirs in zip(key.split(3), jax.random.split(ref, 3), strict=True):
        assert jnp.array_equal(ours.data, jax.random.key_data(theirs))
    assert len(split(key)) == 2
    assert jnp.array_equal(
        key.fold_in(5).data, jax.random.key_data(jax.random.fold_in(ref, 5))
    )
    assert jnp.array_equal(
        key.random_bits(32, (4,)), jax.random.bits(ref, (4,), jnp.uint32)
    )
    assert jnp.allclose(uniform(key, (3,)), jax.random.uniform(ref, (3,)))
    assert jnp.allclose(normal(key, (3,)), jax.random.normal(ref, (3,)))
    assert jnp.array_equal(from_key(ref).data, key.data)
    with pytest.raises(TypeError, match="threefry key"):
        from_key(jnp.zeros(2, jnp.uint32))


def test_select_n_any_position():
    def f(which, a, b, c):
        return lax.select_n(which, a, b, c)

    keys = (ThreeFry(0), ThreeFry(1), ThreeFry(2))
    for i in range(3):
        out = quax.quaxify(f)(jnp.asarray(i), *keys)
        assert isinstance(out, ThreeFry)
        assert jnp.array_equal(out.data, keys[i].data)


def test_arithmetic_is_a_type_error():
    key = ThreeFry(0)
    for fn in (lambda k: k + 1, lambda k: 2 * k, lambda k: -k, lambda k: k < 1):
        with pytest.raises(TypeError, match="not a number"):
            fn(key)
    with pytest.raises(TypeError, match="key<fry>"):
        quax.quaxify(lambda k: jnp.add(k, 1))(key)


def control_flow(key, keys, mu):
    """Keys as a scan carry, scan xs and ys, through cond, and a while carry."""

    def carry_body(k, _):
        k, sub = jax.random.split(k)
        return k, mu * jax.random.normal(sub, (2,))

    key2, draws = lax.scan(carry_body, key, None, length=3)

    def xs_body(total, k):
        return total + mu * jax.random.uniform(k, ()), jax.random.fold_in(k, 1)

    total, folded = lax.scan(xs_body, jnp.zeros(()), keys)
    picked = lax.cond(
        total > 0,
        lambda k: jax.random.split(k)[0],
        lambda k: jax.random.fold_in(k, 3),
        key2,
    )

    def while_body(carry):  # no `mu` inside: reverse mode cannot cross a while
        i, k, acc = carry
        k, sub = jax.random.split(k)
        return i + 1, k, acc + jax.random.normal(sub, ())

    n = (draws[0, 0] > 0).astype(jnp.int32) + 2  # a traced bound: a real while
    _, key3, acc = lax.while_loop(
        lambda c: c[0] < n, while_body, (0, picked, jnp.zeros(()))
    )
    return key2, draws, total, folded, picked, key3, acc


@pytest.mark.parametrize("control_mode", ["eager", "jit_outside", "grad", "vmap"])
def test_control_flow(control_mode):
    args = (ThreeFry(1), ThreeFry(jnp.arange(4)), jnp.asarray(0.7))
    assert_same_as_jax_keys(control_flow, *args, mode=control_mode)


def test_control_flow_keeps_keys():
    args = (ThreeFry(1), ThreeFry(jnp.arange(4)), jnp.asarray(0.7))
    key2, _, _, folded, picked, key3, _ = quax.quaxify(control_flow)(*args)
    assert isinstance(key2, ThreeFry)
    assert isinstance(folded, ThreeFry) and folded.shape == (4,)
    assert isinstance(picked, ThreeFry)
    assert isinstance(key3, ThreeFry)


def test_vmap_over_keys():
    keys = ThreeFry(jnp.arange(3))
    got = jax.vmap(quax.quaxify(lambda k: jax.random.normal(k, (2,))))(keys)
    ref = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (2,)))(jnp.arange(3))
    assert jnp.allclose(got, ref)


def test_batched_keys_through_vmapped_random_functions():
    # Found by the fuzzer: `random_split` of a batch of keys (under `vmap`, as in
    # `randint`) once went through `jax.random.split`, which takes one key only.
    keys = ThreeFry(jnp.arange(6).reshape(2, 3))

    def draw(k):
        per_key = lambda k: (
            jax.random.randint(k, (2,), -5, 5),
            jax.random.split(k, 2),
            jax.random.uniform(jax.random.fold_in(k, 3), (2,)),
        )
        return jax.vmap(jax.vmap(per_key))(k)

    for mode in ("eager", "jit_outside"):
        got = assert_same_as_jax_keys(draw, keys, mode=mode)
        assert isinstance(got[1], ThreeFry) and got[1].shape == (2, 3, 2)
