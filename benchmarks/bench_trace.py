"""Question 1: trace + lower time of a jitted, quaxified, LoRA'd model, as a ratio to
the same for the plain model, measured in the same rounds.

`jax.jit(lambda p, x: quaxify(combine(p, static))(x)).lower(params, x)`, with the
parameters as arguments (as `eqx.filter_jit` passes them) so no weight is baked into
the program as a constant. Every timing uses a fresh lambda, so JAX's top-level trace
cache never hits (its caches of nested jits stay warm, as in real use). "first" also
clears the library's own caches; "repeat" keeps them (a second model of the same
shapes, or a retrace after a change elsewhere).

Models: `eqx.nn.MLP` (depth 8, width 512); a 12-layer transformer (d_model 256,
seq 128) built from equinox layers; and an MLP depth sweep 2 -> 32 (width 256).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _adapters import clear_caches, loraify
from _common import Results, Transformer, interleave, main, mlp, ratios, tokens

import quax


def lowerers(model, lora_model, x):
    params, static = eqx.partition(model, eqx.is_array)
    lparams, lstatic = eqx.partition(lora_model, eqx.is_array)

    def plain():
        return jax.jit(lambda p, x: eqx.combine(p, static)(x)).lower(params, x)

    def quaxified():
        fn = lambda p, x: quax.quaxify(eqx.combine(p, lstatic))(x)
        return jax.jit(fn).lower(lparams, x)

    return {"plain": plain, "first": (clear_caches, quaxified), "repeat": quaxified}


def measure_repeat_trace(res, name, desc, model, x, rounds, at_most=None):
    """Tracing alone (`jax.jit(f).trace`, no lowering), the library's caches warm
    (issue 10: a repeated trace binds the cached walked program)."""
    lora_model = loraify(model, rank=8, key=jr.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    lparams, lstatic = eqx.partition(lora_model, eqx.is_array)

    def plain():
        return jax.jit(lambda p, x: eqx.combine(p, static)(x)).trace(params, x)

    def repeat():
        fn = lambda p, x: quax.quaxify(eqx.combine(p, lstatic))(x)
        return jax.jit(fn).trace(lparams, x)

    times = interleave({"plain": plain, "repeat": repeat}, rounds)
    res.add_time(f"{name}_trace_plain_ms", f"{desc}: plain, trace only", times["plain"])
    res.add_time(
        f"{name}_trace_repeat_ms", f"{desc}: LoRA, trace only, warm", times["repeat"]
    )
    r = ratios(times["repeat"], times["plain"])
    res.add_ratio(
        f"{name}_trace_repeat_ratio", f"{desc}: warm trace / plain trace", r, at_most
    )
    return r


def clear_all() -> None:
    """From cold: JAX's caches (nested jits, lowering) and the library's."""
    jax.clear_caches()
    clear_caches()


def measure_cold(res, name, desc, model, x, rounds, at_most=None):
    """First trace + lower with every cache cleared before each timing, on both
    sides (issue 10's first target)."""
    lora_model = loraify(model, rank=8, key=jr.key(1))
    ls = lowerers(model, lora_model, x)
    times = interleave(
        {"plain": (jax.clear_caches, ls["plain"]), "cold": (clear_all, ls["repeat"])},
        rounds,
    )
    res.add_time(f"{name}_cold_plain_ms", f"{desc}: plain, cold", times["plain"])
    res.add_time(f"{name}_cold_ms", f"{desc}: LoRA, cold", times["cold"])
    cold = ratios(times["cold"], times["plain"])
    res.add_ratio(f"{name}_cold_ratio", f"{desc}: cold / plain cold", cold, at_most)
    return cold


def measure(res, name, desc, model, x, rounds, at_most=None):
    lora_model = loraify(model, rank=8, key=jr.key(1))
    times = interleave(lowerers(model, lora_model, x), rounds)
    res.add_time(f"{name}_plain_ms", f"{desc}: plain", times["plain"])
    res.add_time(f"{name}_first_ms", f"{desc}: LoRA, first trace", times["first"])
    res.add_time(f"{name}_repeat_ms", f"{desc}: LoRA, repeated", times["repeat"])
    first = ratios(times["first"], times["plain"])
    res.add_ratio(f"{name}_first_ratio", f"{desc}: first / plain", first, at_most)
    repeat = ratios(times["repeat"], times["plain"])
    res.add_ratio(f"{name}_repeat_ratio", f"{desc}: repeated / plain", repeat)
    return first


def run(mode: str = "full") -> Results:
    res = Results("trace", "trace + lower of jit(quaxify(LoRA model))", mode)
    key = jr.key(0)
    if mode == "tiny":
        measure(res, "mlp", "MLP 2x16", mlp(2, 16, key=key), jnp.ones(16), 1)
        return res
    rounds = 9 if mode == "full" else 2
    mlp_rounds = 15 if mode == "full" else 2
    measure(res, "mlp", "MLP 8x512", mlp(8, 512, key=key), jnp.ones(512), mlp_rounds)
    measure(
        res,
        "transformer",
        "transformer 12x256 seq128",
        Transformer(12, 256, key=key),
        tokens(128),
        rounds,
        at_most=1.10,
    )
    measure_cold(
        res,
        "transformer",
        "transformer 12x256 seq128",
        Transformer(12, 256, key=key),
        tokens(128),
        rounds,
        at_most=1.10,
    )
    measure_repeat_trace(
        res,
        "transformer",
        "transformer 12x256 seq128",
        Transformer(12, 256, key=key),
        tokens(128),
        rounds,
        at_most=0.10,
    )
    depths = (2, 4, 8, 16, 32) if mode == "full" else (2, 8)
    for depth in depths:
        model = mlp(depth, 256, key=key)
        lora_model = loraify(model, rank=8, key=jr.key(1))
        ls = lowerers(model, lora_model, jnp.ones(256))
        times = interleave(
            {"plain": ls["plain"], "first": ls["first"]},
            max(rounds - 2, 2) if depth < 32 else max(rounds - 4, 2),
        )
        desc = f"sweep depth {depth:2d}"
        res.add_time(f"sweep{depth}_plain_ms", f"{desc}: plain", times["plain"])
        res.add_time(f"sweep{depth}_first_ms", f"{desc}: LoRA, first", times["first"])
        res.add_ratio(
            f"sweep{depth}_ratio",
            f"{desc}: first / plain",
            ratios(times["first"], times["plain"]),
        )
    return res


if __name__ == "__main__":
    main(run)
