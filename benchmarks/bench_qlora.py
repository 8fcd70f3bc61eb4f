"""Question 8: quantized weights and QLoRA against the float model: time and memory.

A matmul `y = W x` (`W` d x d, `x` d x 64) with `W` in float32, in int8 with
per-channel scales and in packed int4 with per-group scales (groups of 64), through
quaxify; and one SGD step training rank-8 adapters of a 2-layer MLP (width d) whose
frozen weights are float32 (LoRA) or int4 (QLoRA). Every side takes plain arrays and
builds its values inside the jitted function, so what differs is the compiled
program. Times alternate the sides round by round; memory is XLA's
`memory_analysis()` of the compiled function: arguments (the stored weights),
temporaries (whether a full-precision copy of a weight is allocated) and peak.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from _common import OURS, Results, Variant, block, interleave, main, ratios

import quax


MB = 1 / 2**20


def memory(fn, *args) -> dict[str, int]:
    """XLA's `memory_analysis()` of `fn` compiled for `args` (empty if unsupported)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        return {}
    out = {
        k: int(getattr(stats, k))
        for k in ("temp_size_in_bytes", "argument_size_in_bytes")
    }
    peak = getattr(stats, "peak_memory_in_bytes", None)
    out["peak"] = int(peak) if peak is not None else -1
    return out


def run(mode: str = "full") -> Results:
    d = {"full": 2048, "quick": 1024, "tiny": 64}[mode]
    rounds = {"full": 15, "quick": 5, "tiny": 1}[mode]
    number = {"full": 5, "quick": 3, "tiny": 1}[mode]
    batch, rank, group = 64, 8, min(64, d)
    res = Results(
        "qlora", f"quantized matmul and QLoRA step, d={d}, batch {batch}", mode
    )
    if not OURS:
        res.note("quax.quantized is this repository's; nothing to measure here")
        res.add("skipped", "skipped (no quax.quantized)", True)
        return res
    from quax.quantized import QuantizedArray, quantize

    k1, k2, k3 = jr.split(jr.key(0), 3)
    w = jr.normal(k1, (d, d)) / d**0.5
    x = jr.normal(k2, (d, batch))

    # -- the matmul --
    w8 = quantize(w, bits=8)
    w4 = quantize(w, bits=4, group_size=group)

    def quantized_matmul(template):
        def f(q, scale, x):
            wq = eqx.tree_at(lambda m: (m.q, m.scale), template, (q, scale))
            return quax.quaxify(lambda w, x: w @ x)(wq, x)

        return jax.jit(f)

    fns = {
        "float": (jax.jit(lambda w, x: w @ x), (w, x)),
        "int8": (quantized_matmul(w8), (w8.q, w8.scale, x)),
        "int4": (quantized_matmul(w4), (w4.q, w4.scale, x)),
    }
    ref = fns["float"][0](w, x)
    for name in ("int8", "int4"):
        f, args = fns[name]
        err = float(jnp.max(jnp.abs(f(*args) - ref)) / jnp.max(jnp.abs(ref)))
        res.add(f"{name}_relerr", f"matmul {name}: max rel. difference to float", err)
    variants: dict[str, Variant] = {
        k: (lambda f=f, a=a: block(f(*a))) for k, (f, a) in fns.items()
    }
    for f, a in fns.values():
        block(f(*a))  # compile
    times = interleave(variants, rounds, number=number)
    for name, desc in (("float", "float32"), ("int8", "int8/ch"), ("int4", "int4/g")):
        res.add_time(f"matmul_{name}_ms", f"matmul {desc}", times[name])
    for name in ("int8", "int4"):
        res.add_ratio(
            f"matmul_{name}_vs_float",
            f"matmul {name} / float32",
            ratios(times[name], times["float"]),
        )
    for name, (f, args) in fns.items():
        m = memory(f, *args)
        if not m:
            res.note("memory_analysis() is not available on this backend")
            break
        res.add(
            f"matmul_{name}_args_mb",
            f"matmul {name}: argument MB",
            m["argument_size_in_bytes"] * MB,
        )
        res.add(
            f"matmul_{name}_temp_mb",
            f"matmul {name}: temp MB",
            m["temp_size_in_bytes"] * MB,
        )

    # -- a training step of the adapters --
    mlp = eqx.nn.MLP(d, d, d, 1, key=k3)
    float_model = quax.lora.loraify(mlp, rank=rank, key=jr.key(1))
    q_model = quax.lora.loraify(
        quax.quantized.quantize_model(mlp, bits=4, group_size=group),
        rank=rank,
        key=jr.key(1),
    )
    xb = jr.normal(jr.key(2), (batch, d))

    def stepper(model):
        params, static = eqx.partition(model, quax.lora.trainable(model))
        frozen, skeleton = eqx.partition(static, eqx.is_array)

        def step(params, frozen, xb):
            def loss(params):
                m = eqx.combine(params, frozen, skeleton)
                return jnp.mean(jax.vmap(quax.quaxify(m))(xb) ** 2)

            grads = jax.grad(loss)(params)
            return jtu.tree_map(lambda p, g: p - 0.01 * g, params, grads)

        return jax.jit(step), (params, frozen, xb)

    steps = {"lora": stepper(float_model), "qlora": stepper(q_model)}
    variants: dict[str, Variant] = {
        k: (lambda f=f, a=a: block(f(*a))) for k, (f, a) in steps.items()
    }
    for f, a in steps.values():
        block(f(*a))  # compile
    times = interleave(variants, rounds, number=number)
    res.add_time("step_lora_ms", "step: LoRA on float32 weights", times["lora"])
    res.add_time("step_qlora_ms", "step: QLoRA on int4 weights", times["qlora"])
    res.add_ratio(
        "step_qlora_vs_lora",
        "step: QLoRA / LoRA",
        ratios(times["qlora"], times["lora"]),
    )
    full = d * d * 4
    for name, (f, args) in steps.items():
        m = memory(f, *args)
        if not m:
            break
        res.add(
            f"step_{name}_args_mb",
            f"step {name}: argument MB (weights)",
            m["argument_size_in_bytes"] * MB,
        )
        res.add(
            f"step_{name}_temp_mb",
            f"step {name}: temp MB",
            m["temp_size_in_bytes"] * MB,
        )
        res.add(f"step_{name}_peak_mb", f"step {name}: peak MB", m["peak"] * MB)
        res.add(
            f"step_{name}_full_copies",
            f"step {name}: temp / one float32 weight",
            m["temp_size_in_bytes"] / full,
            "x",
        )
    assert isinstance(q_model.layers[0].weight.w, QuantizedArray)
    return res


if __name__ == "__main__":
    main(run)
