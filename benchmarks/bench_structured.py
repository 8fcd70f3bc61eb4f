"""Question 9: structured matrices. Products with `quax.structured` matrices of size
n = 4096 (tridiagonal, diagonal, scaled identity, Kronecker of two 64 x 64 factors)
against the same product with the dense n x n matrix, and `jnp.linalg.solve` on a
tridiagonal matrix (which quax sends to `lax.linalg.tridiagonal_solve`) against the
dense LU solve, all jitted, in the same rounds. The O(n) claim is checked by timing
the tridiagonal product at 16 n as well: the time grows about 16x, as O(n) does,
while a dense matrix would grow 256x (and not fit).
"""

import importlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import Results, block, interleave, main, ratios

import quax


def _structured_module():
    try:
        return importlib.import_module("quax.structured")
    except ImportError:
        return None


def tridiagonal(structured, n: int):
    d, lo, up = jr.normal(jr.key(0), (3, n))
    return structured.TridiagonalMatrix(d + 4.0, lo[:-1], up[:-1])


def run(mode: str = "full") -> Results:
    res = Results("structured", "structured matrices against dense at n = 4096", mode)
    structured = _structured_module()
    if structured is None:
        res.note("this library has no quax.structured")
        return res
    n, rounds = {"full": (4096, 15), "quick": (4096, 5)}.get(mode, (256, 2))
    f = int(round(n**0.5))
    k = jr.split(jr.key(1), 3)
    values = {
        "tridiagonal": tridiagonal(structured, n),
        "diagonal": structured.Diagonal(jr.normal(k[0], (n,))),
        "identity": structured.Identity(n, 2.0),
        "kronecker": structured.Kronecker(
            jr.normal(k[1], (f, f)), jr.normal(k[2], (f, f))
        ),
    }
    x = jr.normal(jr.key(2), (n, 16))
    matmul = jax.jit(quax.quaxify(lambda a, x: a @ x))
    dense_matmul = jax.jit(lambda m, x: m @ x)
    for name, value in values.items():
        dense = value.materialise()
        np.testing.assert_allclose(
            matmul(value, x), dense_matmul(dense, x), rtol=2e-3, atol=2e-3
        )
        times = interleave(
            {
                "dense": lambda dense=dense: block(dense_matmul(dense, x)),
                "ours": lambda value=value: block(matmul(value, x)),
            },
            rounds=rounds,
        )
        res.add_time(f"{name}_time", f"{name} @ {n}x16", times["ours"])
        res.add_ratio(
            f"{name}_dense",
            f"{name} @ {n}x16 / dense matmul",
            ratios(times["ours"], times["dense"]),
        )

    # jnp.linalg.solve: tridiagonal_solve against the dense LU solve.
    t = values["tridiagonal"]
    dense_t = t.materialise()
    solve = jax.jit(quax.quaxify(jnp.linalg.solve))
    dense_solve = jax.jit(jnp.linalg.solve)
    np.testing.assert_allclose(
        solve(t, x), dense_solve(dense_t, x), rtol=1e-3, atol=1e-3
    )
    times = interleave(
        {
            "dense": lambda: block(dense_solve(dense_t, x)),
            "ours": lambda: block(solve(t, x)),
        },
        rounds=max(2, rounds // 3),
    )
    res.add_time("solve_time", f"jnp.linalg.solve, tridiagonal {n}", times["ours"])
    res.add_ratio(
        "solve_dense",
        f"jnp.linalg.solve tridiagonal / dense LU, n = {n}",
        ratios(times["ours"], times["dense"]),
    )

    # O(n): the same product at 16 n.
    big = tridiagonal(structured, 16 * n)
    xb = jr.normal(jr.key(3), (16 * n, 16))
    times = interleave(
        {
            "n": lambda: block(matmul(t, x)),
            "16n": lambda: block(matmul(big, xb)),
        },
        rounds=rounds,
    )
    res.add_ratio(
        "tridiagonal_scaling",
        f"tridiagonal @ x: time at n = {16 * n} / time at n = {n} (O(n): ~16)",
        ratios(times["16n"], times["n"]),
    )
    return res


if __name__ == "__main__":
    main(run)
