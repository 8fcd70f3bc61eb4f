"""Question 4: per-equation overhead. A chain of N primitives on a plain array, in a
function that also takes one value (a rule-less `Box`, used once at the end), traced
with `jax.make_jaxpr` through `quaxify`, against plain `make_jaxpr` of the same
function on dense arrays. Every equation but the last meets no value, so this is
the cost the library adds to equations it has nothing to do with.
"""

import jax
import jax.lax as lax
import jax.numpy as jnp
from _adapters import Box, clear_caches
from _common import Results, interleave, main, ratios, walked

import quax


_OPS = (lax.sin, lax.cos, lax.neg, lax.exp)


def chain(n: int):
    def f(v, x):
        for i in range(n):
            x = _OPS[i % len(_OPS)](x)
        return x + v

    return f


def run(mode: str = "full") -> Results:
    n = {"full": 2000, "quick": 500, "tiny": 20}[mode]
    rounds = {"full": 21, "quick": 4, "tiny": 1}[mode]
    res = Results(
        "dispatch_overhead", f"chain of {n} primitives next to one value", mode
    )
    f = chain(n)
    x = jnp.ones((8,), jnp.float32)
    v = Box(jnp.ones((8,), jnp.float32))
    dense = v.array

    variants = {
        # A fresh lambda per call: JAX's trace cache never hits.
        "plain": lambda: jax.make_jaxpr(lambda v, x: f(v, x))(dense, x),
        "first": (
            clear_caches,
            lambda: jax.make_jaxpr(lambda v, x: quax.quaxify(f)(v, x))(v, x),
        ),
        "repeat": lambda: jax.make_jaxpr(lambda v, x: quax.quaxify(f)(v, x))(v, x),
    }
    times = interleave(variants, rounds)
    res.add_time("plain_ms", "plain make_jaxpr", times["plain"])
    res.add_time(
        "first_ms", "quaxify, first trace (library caches cleared)", times["first"]
    )
    res.add_time(
        "repeat_ms", "quaxify, repeated trace (library caches warm)", times["repeat"]
    )
    first = ratios(times["first"], times["plain"])
    repeat = ratios(times["repeat"], times["plain"])
    # The target counts the library's dispatch, not re-running the user's Python: for
    # quax that is the walk of an already-traced jaxpr (the repeated trace). Quax
    # dispatches while it traces, so for it both are a trace with dispatch.
    res.add_ratio("first_ratio", "first trace / plain", first)
    res.add_ratio("repeat_ratio", "repeated trace / plain", repeat, 1.2)
    plain_us = [b / n * 1e6 for b in times["plain"]]
    first_us = [
        (a - b) / n * 1e6 for a, b in zip(times["first"], times["plain"], strict=True)
    ]
    repeat_us = [a / n * 1e6 for a in times["repeat"]]
    res.add_ratio("plain_us_per_eqn", "plain: us per equation", plain_us, unit="us")
    res.add_ratio(
        "first_us_per_eqn", "first trace: extra us per eqn", first_us, unit="us"
    )
    res.add_ratio(
        "repeat_us_per_eqn", "repeated trace: us per eqn", repeat_us, unit="us"
    )
    n_out = len(walked(jax.make_jaxpr(quax.quaxify(f))(v, x)).jaxpr.eqns)
    res.add("eqns_out", "equations in the quaxified jaxpr", n_out)
    return res


if __name__ == "__main__":
    main(run)
