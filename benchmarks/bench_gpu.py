"""Question 11: the GPU row of issue 10. On whatever accelerator JAX finds first:

- trace + lower of the 12-layer LoRA transformer, first (library caches cleared) and
  from cold (JAX's caches cleared too), as ratios to plain JAX;
- warm eager calls of the LoRA transformer and of a LoRA MLP of width 4096, against a
  warm `jax.jit` of the dense model;
- the compiled LoRA layer at d = 4096 (batch 64 and batch 4096): forward and
  forward+backward against the hand-written program, and the memory of one step.

The rows are those of `bench_trace.py`, `bench_eager.py` and `bench_lora_runtime.py`,
run at these sizes, with the question's prefix on each key. On a CPU the script runs
but says so: the figures are the GPU row only when `jax.devices()` is a GPU.

    python benchmarks/bench_gpu.py        # on a GPU machine
"""

import bench_eager
import bench_lora_runtime
import bench_trace
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import Results, Transformer, main, mlp, tokens


def run(mode: str = "full") -> Results:
    device = jax.devices()[0]
    res = Results("gpu", f"the GPU row, on {device.device_kind}", mode)
    if device.platform != "gpu":
        res.note(f"no GPU: these figures are from {device.platform}, not a GPU row")
    tiny = mode == "tiny"
    rounds = 1 if tiny else (3 if mode == "quick" else 7)
    key = jr.key(0)
    if tiny:
        model, x = mlp(2, 16, key=key), jnp.ones(16)
    else:
        model, x = Transformer(12, 256, key=key), tokens(128)
    desc = "trace+lower, " + ("MLP 2x16" if tiny else "transformer 12x256")
    bench_trace.measure(res, "trace", desc, model, x, rounds, at_most=1.10)
    bench_trace.measure_cold(res, "trace", desc, model, x, rounds, at_most=1.10)
    cases = (
        [("mlp_tiny", 1)]
        if tiny
        else [("mlp4096", 3 * rounds), ("transformer", 3 * rounds)]
    )
    merge(res, "eager", bench_eager.run(mode, cases=cases))
    sizes = (64,) if tiny else (4096,)
    for batch in (64,) if tiny else (64, 4096):
        part = bench_lora_runtime.run(mode, sizes=sizes, batch=batch)
        merge(res, f"lora_b{batch}", part, f"batch {batch}, ")
    return res


def merge(res: Results, prefix: str, part: Results, desc: str = "") -> None:
    """Copy `part`'s rows into `res`, with `prefix` on each key."""
    for row in part.rows:
        res.rows.append(
            dict(row, key=f"{prefix}_{row['key']}", desc=desc + row["desc"])
        )
    res.notes += part.notes


if __name__ == "__main__":
    main(run)
