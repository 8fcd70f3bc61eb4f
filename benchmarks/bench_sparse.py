"""Question 8: sparse @ dense. A 4096 x 4096 `quax.sparse.BCOO` at 0.1%, 1% and 10%
density times a dense 4096 x 16 matrix, against the dense matmul and against
`jax.experimental.sparse.BCOO` on the same entries, all jitted, in the same rounds
(alternating sides; median of per-round ratios).

Targets (issue 9): faster than dense at 1% density; no slower than
`jax.experimental.sparse` (ratio <= 1.05x: within timing noise).
"""

import importlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import Results, block, interleave, main, ratios
from jax.experimental import sparse as jsparse

import quax


def _sparse_module():
    try:
        return importlib.import_module("quax.sparse")
    except ImportError:
        return None


def random_entries(key, n: int, density: float):
    """`nse` random coordinates of an n x n matrix and their values (a repeated
    coordinate is rare, and both sparse formats add repeated entries up)."""
    nse = max(1, int(round(density * n * n)))
    k1, k2 = jr.split(key)
    flat = jr.randint(k1, (nse,), 0, n * n)
    indices = jnp.stack([flat // n, flat % n], -1).astype(jnp.int32)
    return jr.normal(k2, (nse,)), indices


def run(mode: str = "full") -> Results:
    res = Results(
        "sparse", "sparse @ dense: BCOO against dense and jax.experimental", mode
    )
    sparse = _sparse_module()
    if sparse is None:
        res.note("this library has no quax.sparse")
        return res
    n, k, rounds = {"full": (4096, 16, 15), "quick": (4096, 16, 5)}.get(
        mode, (256, 4, 2)
    )
    x = jr.normal(jr.key(1), (n, k))
    ours_fn = jax.jit(quax.quaxify(lambda a, x: a @ x))
    theirs_fn = jax.jit(lambda a, x: a @ x)
    dense_fn = jax.jit(lambda m, x: m @ x)
    for density in (0.001, 0.01, 0.1):
        data, indices = random_entries(jr.key(0), n, density)
        ours = sparse.BCOO(data, indices, (n, n))
        theirs = jsparse.BCOO((data, indices), shape=(n, n))
        dense = ours.todense()
        expected = np.asarray(dense_fn(dense, x))
        for out in (ours_fn(ours, x), theirs_fn(theirs, x)):
            np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-3, atol=1e-3)
        times = interleave(
            {
                "dense": lambda dense=dense: block(dense_fn(dense, x)),
                "ours": lambda ours=ours: block(ours_fn(ours, x)),
                "theirs": lambda theirs=theirs: block(theirs_fn(theirs, x)),
            },
            rounds=rounds,
        )
        pct = f"{100 * density:g}%"
        tag = f"{density:g}".replace(".", "_")
        res.add_time(
            f"dense_{tag}", f"{pct}: dense matmul {n}x{n} @ {n}x{k}", times["dense"]
        )
        res.add_time(f"ours_{tag}", f"{pct}: quax BCOO @ dense", times["ours"])
        res.add_time(f"jsparse_{tag}", f"{pct}: jax.experimental BCOO", times["theirs"])
        res.add_ratio(
            f"ours_dense_{tag}",
            f"{pct}: quax BCOO / dense",
            ratios(times["ours"], times["dense"]),
            at_most=1.0 if density == 0.01 else None,
        )
        res.add_ratio(
            f"ours_jsparse_{tag}",
            f"{pct}: quax BCOO / jax.experimental BCOO",
            ratios(times["ours"], times["theirs"]),
            at_most=1.05,
        )
    return res


if __name__ == "__main__":
    main(run)
