"""Differential testing: a quaxified function against the same function on dense arrays."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import quax


MODES = ("eager", "jit_outside", "jit_inside", "grad", "vmap")


def densify(tree: Any) -> Any:
    """Every value in `tree` replaced by its `materialise()`."""
    return jtu.tree_map(
        lambda x: x.materialise() if isinstance(x, quax.Value) else x,
        tree,
        is_leaf=lambda x: isinstance(x, quax.Value),
    )


def tree_allclose(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-5) -> bool:
    a, b = densify(a), densify(b)
    la, ta = jtu.tree_flatten(a)
    lb, tb = jtu.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype == jax.dtypes.float0:
            continue
        if not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def _float_leaves_first_arg(args: tuple) -> int | None:
    for i, x in enumerate(args):
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(
            x.dtype, jnp.floating
        ):
            return i
    return None


def run_mode(
    fn: Callable, args: tuple, mode: str, quaxed: bool, argnum: int | None = None
) -> Any:
    """Run `fn` (quaxified or not) on `args` in one of the `MODES`. In "grad" mode the
    gradient is taken with respect to `args[argnum]` (default: the first plain
    floating-point argument)."""
    call = quax.quaxify(fn) if quaxed else fn
    if mode == "eager":
        return call(*args)
    if mode == "jit_outside":
        return eqx.filter_jit(call)(*args)
    if mode == "jit_inside":
        return call(*args) if not quaxed else quax.quaxify(jax.jit(fn))(*args)
    if mode == "grad":
        # Gradient with respect to the first plain floating-point argument.
        i = _float_leaves_first_arg(args) if argnum is None else argnum
        if i is None:
            return call(*args)

        def scalar(x):
            new = list(args)
            new[i] = x
            out = densify(call(*new))
            leaves = [
                jnp.sum(jnp.real(o))
                for o in jtu.tree_leaves(out)
                if jnp.issubdtype(o.dtype, jnp.inexact)
            ]
            return sum(leaves, jnp.zeros(()))

        return jax.jit(jax.grad(scalar))(args[i])  # one compile, not op-by-op
    if mode == "vmap":
        stacked = jtu.tree_map(
            lambda x: jnp.stack([x, x]) if eqx.is_array(x) else x, args
        )
        # Materialised inside the vmap: a batched value (e.g. `Scaled` with a batched
        # scalar factor) is only meaningful per example.
        return eqx.filter_jit(eqx.filter_vmap(lambda *a: densify(call(*a))))(*stacked)
    raise ValueError(mode)


def assert_matches_dense(
    fn: Callable, *args: Any, mode: str = "eager", rtol=1e-5, atol=1e-5
):
    """`quaxify(fn)` on `args` equals `fn` on the materialised `args`, in `mode`."""
    # The same argument is differentiated in both runs (after densify, a value
    # would otherwise become "the first plain floating-point argument").
    argnum = _float_leaves_first_arg(args)
    got = run_mode(fn, args, mode, quaxed=True, argnum=argnum)
    expected = run_mode(fn, densify(args), mode, quaxed=False, argnum=argnum)
    assert tree_allclose(got, expected, rtol=rtol, atol=atol), (got, expected)
    return got


def walked(closed: Any) -> Any:
    """The program quax walked, from `jax.make_jaxpr(quax.quaxify(f))(...)`: inside a
    trace, `quaxify` binds the walked program as one `jit` equation (named after `f`),
    so look inside it. Any other jaxpr is returned as it is."""
    eqns = closed.jaxpr.eqns
    if len(eqns) == 1 and eqns[0].primitive.name in ("jit", "pjit"):
        (eqn,) = eqns
        if list(eqn.outvars) == list(closed.jaxpr.outvars) and list(eqn.invars) == list(
            closed.jaxpr.invars
        ):
            return eqn.params["jaxpr"]
    return closed
