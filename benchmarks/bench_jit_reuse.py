"""Question 2: a model that calls the same jitted block 32 times. How long the
quaxified trace takes against the plain one, and how many times the library walks
(quaxifies) the block's body: once is the target.

Two models: the same layer 32 times, and 32 different layers of the same shapes.
The weight of each layer is a value: a LoraArray where the library has one, else a
rule-less `Box`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _adapters import Box, clear_caches, count_walks, have_lora, loraify
from _common import Results, count_eqns, interleave, main, ratios, walked

import quax


@jax.jit
def block(layer, x):
    return jnp.tanh(layer(x))


def same_layer(calls: int):
    def f(layer, x):
        for _ in range(calls):
            x = block(layer, x)
        return x

    return f


def many_layers(layers, x):
    for layer in layers:
        x = block(layer, x)
    return x


def valueify(layer: eqx.nn.Linear, key) -> eqx.nn.Linear:
    if have_lora():
        return loraify(layer, rank=8, key=key)
    return eqx.tree_at(lambda m: m.weight, layer, Box(layer.weight))


def run(mode: str = "full") -> Results:
    calls = {"full": 32, "quick": 32, "tiny": 4}[mode]
    width = {"full": 256, "quick": 256, "tiny": 16}[mode]
    rounds = {"full": 15, "quick": 3, "tiny": 1}[mode]
    kind = "LoraArray" if have_lora() else "Box (rule-less)"
    res = Results("jit_reuse", f"a jitted block called {calls} times ({kind})", mode)
    keys = jr.split(jr.key(0), 2 * calls)
    x = jnp.ones((width,), jnp.float32)
    dense_layers = [eqx.nn.Linear(width, width, key=keys[i]) for i in range(calls)]
    layers = [
        valueify(layer, k) for layer, k in zip(dense_layers, keys[calls:], strict=True)
    ]
    f_same = same_layer(calls)

    for name, f, arg, dense_arg in (
        ("same", f_same, layers[0], dense_layers[0]),
        ("many", many_layers, layers, dense_layers),
    ):
        desc = "same layer" if name == "same" else f"{calls} layers"
        clear_caches()
        with count_walks() as walks:
            closed = walked(jax.make_jaxpr(quax.quaxify(f))(arg, x))
        res.add(
            f"{name}_walks",
            f"{desc}: walks of the block",
            walks[0],
            target="1",
            met=walks[0] == 1,
        )
        top, nested = count_eqns(closed)
        res.add(f"{name}_eqns", f"{desc}: equations (top level)", top)

        variants = {
            "plain": lambda f=f, a=dense_arg: jax.make_jaxpr(lambda m, x: f(m, x))(
                a, x
            ),
            "quax": (
                clear_caches,
                lambda f=f, a=arg: jax.make_jaxpr(lambda m, x: quax.quaxify(f)(m, x))(
                    a, x
                ),
            ),
        }
        times = interleave(variants, rounds)
        res.add_time(f"{name}_plain_ms", f"{desc}: plain make_jaxpr", times["plain"])
        res.add_time(
            f"{name}_quax_ms", f"{desc}: quaxified, first trace", times["quax"]
        )
        res.add_ratio(
            f"{name}_ratio",
            f"{desc}: quaxified / plain",
            ratios(times["quax"], times["plain"]),
        )
    return res


if __name__ == "__main__":
    main(run)
