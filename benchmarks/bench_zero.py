"""Question 7: Zero elimination. The equations in the jaxpr of a function given a
symbolic `quax.zero.Zero`, against the same function given a dense array of zeros
(top level, and counting every sub-jaxpr).

- chain: `x = tanh(x + z * x)`, 32 times (the mul and the add vanish with a Zero);
- mlp: `eqx.nn.MLP` (depth 4, width 64) whose biases are all Zero;
- matmul: `tanh(w @ x + w @ z)` with `z` a Zero vector.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _adapters import Zero, have_zero
from _common import Results, count_eqns, main, mlp, walked

import quax


def chain(n: int):
    def f(x, z):
        for _ in range(n):
            x = jnp.tanh(x + z * x)
        return x

    return f


def matmul(w, x, z):
    return jnp.tanh(w @ x + w @ z)


def run(mode: str = "full") -> Results:
    res = Results("zero", "equations with and without Zero", mode)
    if not have_zero():
        res.note("this library has no quax.zero yet")
        return res
    n, width = (32, 64) if mode != "tiny" else (4, 8)
    x = jnp.ones((width,), jnp.float32)
    w = jr.normal(jr.key(0), (width, width))
    model = mlp(4, width, key=jr.key(1))
    biases = lambda m: [layer.bias for layer in m.layers]
    zero_model = eqx.tree_at(
        biases, model, [Zero(b.shape, b.dtype) for b in biases(model)]
    )
    dense_model = eqx.tree_at(biases, model, [jnp.zeros_like(b) for b in biases(model)])
    zx = Zero(x.shape, x.dtype)
    cases = (
        ("chain", f"chain of {n}", chain(n), chain(n), (x, jnp.zeros_like(x)), (x, zx)),
        ("mlp", "MLP, Zero biases", dense_model, zero_model, (x,), (x,)),
        ("matmul", "w@x + w@z", matmul, matmul, (w, x, jnp.zeros_like(x)), (w, x, zx)),
    )
    for key, desc, f_dense, f_zero, dense_args, zero_args in cases:
        # (a model is called as a function: its arrays are constants of the jaxpr)
        dense = count_eqns(jax.make_jaxpr(f_dense)(*dense_args))
        zero = count_eqns(walked(jax.make_jaxpr(quax.quaxify(f_zero))(*zero_args)))
        res.add(f"{key}_dense", f"{desc}: equations, dense zeros", dense[0])
        res.add(f"{key}_zero", f"{desc}: equations, Zero", zero[0])
        res.add(f"{key}_dense_nested", f"{desc}: nested equations, dense", dense[1])
        res.add(f"{key}_zero_nested", f"{desc}: nested equations, Zero", zero[1])
        res.add(
            f"{key}_ratio", f"{desc}: Zero / dense (nested)", zero[1] / dense[1], "x"
        )
    return res


if __name__ == "__main__":
    main(run)
