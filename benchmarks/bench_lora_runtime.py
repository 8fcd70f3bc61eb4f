"""Question 6: compiled runtime of a LoRA layer, and memory of one training step.

`y = (w + a b) x` with `w` d x d, rank 8, `x` d x 64. Forward, and forward+backward
(the gradient of `sum(y**2)` with respect to `a` and `b` only), each jitted, for the
quaxified LoraArray against the hand-written `w@x + a@(b@x)` and against the
materialised `(w + a@b)@x`, interleaved in the same rounds. All three take and return
plain arrays (the LoraArray is built inside the jitted function), so what differs is
the compiled program and not the cost of flattening Modules on each call.

Memory: XLA's `memory_analysis()` of one compiled SGD step: LoRA through quax, LoRA
written by hand, and full fine-tuning of `w`. The LoRA gradient must not allocate a
full-size (d x d) buffer for the frozen weight: its temporaries must stay below d*d.
"""

import collections
import re

import jax
import jax.numpy as jnp
import jax.random as jr
from _adapters import make_lora, with_parts
from _common import Results, block, interleave, main, ratios

import quax


def matmul(lora, x):
    return lora @ x


def quaxified(template):
    """`(w + a b) x` through quaxify, with the same calling convention as the
    hand-written version (plain arrays in and out), so the comparison is of the
    compiled programs, not of flattening Modules at each call."""

    def f(w, a, b, x):
        return quax.quaxify(matmul)(with_parts(template, w, a, b), x)

    return f


def hand(w, a, b, x):
    return w @ x + a @ (b @ x)


def materialised(w, a, b, x):
    return (w + a @ b) @ x


def dense_fns(f):
    loss = lambda ab, w, x: jnp.sum(f(w, ab[0], ab[1], x) ** 2)
    fwd = jax.jit(lambda ab, w, x: f(w, ab[0], ab[1], x))
    grad = jax.jit(jax.grad(loss))

    def step(ab, w, x):
        g = jax.grad(loss)(ab, w, x)
        return jax.tree.map(lambda p, g: p - 0.01 * g, ab, g)

    return fwd, grad, jax.jit(step)


def full_step(w, x):
    g = jax.grad(lambda w: jnp.sum((w @ x) ** 2))(w)
    return w - 0.01 * g


def memory(fn, *args) -> dict[str, int]:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        return {}
    out = {
        k: int(getattr(stats, k))
        for k in (
            "temp_size_in_bytes",
            "argument_size_in_bytes",
            "output_size_in_bytes",
        )
    }
    peak = getattr(stats, "peak_memory_in_bytes", None)
    if peak is None:  # older jaxlib: arguments + outputs + temporaries - aliased
        peak = sum(out.values()) - int(stats.alias_size_in_bytes)
    out["peak"] = int(peak)
    return out


def hlo_ops(fn, *args) -> collections.Counter:
    """The kinds of instruction in the optimised (compiled) HLO, with counts."""
    text = fn.lower(*args).compile().as_text()
    return collections.Counter(re.findall(r"= [^=]*? ([a-z][a-z\-]*)\(", text))


def run(
    mode: str = "full", sizes: tuple[int, ...] | None = None, batch: int = 64
) -> Results:
    """`sizes` (the `d`s) and `batch` default to those of `mode`; `bench_gpu.py`
    asks for d = 4096."""
    if sizes is None:
        sizes = {"full": (1024, 2048), "quick": (1024,), "tiny": (64,)}[mode]
    rounds = {"full": 15, "quick": 5, "tiny": 1}[mode]
    number = {"full": 10, "quick": 5, "tiny": 1}[mode]
    rank = 8
    res = Results(
        "lora_runtime", f"compiled LoRA layer, rank {rank}, batch {batch}", mode
    )
    for d in sizes:
        k1, k2, k3, k4 = jr.split(jr.key(d), 4)
        w = jr.normal(k1, (d, d)) / d**0.5
        a = jr.normal(k2, (d, rank)) / d**0.5
        b = jr.normal(k3, (rank, d)) / rank**0.5  # nonzero, so nothing folds away
        x = jr.normal(k4, (d, batch))
        qfwd, qgrad, qstep = dense_fns(quaxified(make_lora(w, a, b)))
        hfwd, hgrad, hstep = dense_fns(hand)
        mfwd, mgrad, _ = dense_fns(materialised)
        ab = (a, b)
        qargs = hargs = (ab, w)
        # Same results, or the timings compare different things.
        ref = hfwd(ab, w, x)
        err = float(jnp.max(jnp.abs(qfwd(ab, w, x) - ref)) / jnp.max(jnp.abs(ref)))
        res.add(f"d{d}_fwd_relerr", f"d={d}: forward, max rel. difference", err)
        calls = {
            "fwd": {"quax": (qfwd, qargs), "hand": (hfwd, hargs), "mat": (mfwd, hargs)},
            "fwdbwd": {
                "quax": (qgrad, qargs),
                "hand": (hgrad, hargs),
                "mat": (mgrad, hargs),
            },
        }
        for what, fns in calls.items():
            same = hlo_ops(fns["quax"][0], ab, w, x) == hlo_ops(
                fns["hand"][0], ab, w, x
            )
            label = "forward" if what == "fwd" else "fwd+bwd"
            desc = f"d={d}: {label}, compiled ops same as hand-written"
            res.add(f"d{d}_{what}_same_hlo", desc, same)
            variants = {
                k: (lambda f=f, args=args, x=x: block(f(*args, x)))
                for k, (f, args) in fns.items()
            }
            for f in variants.values():
                f()  # compile
            times = interleave(variants, rounds, number=number)
            for k, desc in (
                ("hand", "hand-written"),
                ("mat", "materialised"),
                ("quax", "quaxified"),
            ):
                res.add_time(f"d{d}_{what}_{k}_ms", f"d={d}: {label}, {desc}", times[k])
            target = 1.02 if what == "fwdbwd" else None
            res.add_ratio(
                f"d{d}_{what}_vs_hand",
                f"d={d}: {label}, quaxified / hand-written",
                ratios(times["quax"], times["hand"]),
                target,
            )
            res.add_ratio(
                f"d{d}_{what}_vs_mat",
                f"d={d}: {label}, quaxified / materialised",
                ratios(times["quax"], times["mat"]),
            )
        mq = memory(qstep, ab, w, x)
        mh = memory(hstep, ab, w, x)
        mf = memory(full_step, w, x)
        if mq:
            mb = 1 / 2**20
            res.add(
                f"d{d}_mem_quax_mb",
                f"d={d}: peak MB, LoRA step (quax)",
                mq["peak"] * mb,
            )
            res.add(
                f"d{d}_mem_hand_mb",
                f"d={d}: peak MB, LoRA step (hand)",
                mh["peak"] * mb,
            )
            res.add(
                f"d{d}_mem_full_mb", f"d={d}: peak MB, full fine-tune", mf["peak"] * mb
            )
            res.add(
                f"d{d}_temp_quax_mb",
                f"d={d}: temp MB, LoRA step (quax)",
                mq["temp_size_in_bytes"] * mb,
            )
            res.add(
                f"d{d}_temp_full_mb",
                f"d={d}: temp MB, full fine-tune",
                mf["temp_size_in_bytes"] * mb,
            )
            # No temporary the size of `w`, or (where the activations are that
            # large too: batch >= d) none beyond the hand-written step's.
            no_full = mq["temp_size_in_bytes"] < d * d * w.dtype.itemsize or (
                batch >= d and mq["temp_size_in_bytes"] <= mh["temp_size_in_bytes"]
            )
            desc = f"d={d}: LoRA step allocates no d x d temp"
            res.add(f"d{d}_no_full_grad", desc, no_full, target="True", met=no_full)
            res.add(
                f"d{d}_mem_vs_full",
                f"d={d}: peak, LoRA (quax) / full fine-tune",
                mq["peak"] / mf["peak"],
                "x",
            )
        else:
            res.note("memory_analysis() is not available on this backend")
    return res


if __name__ == "__main__":
    main(run)
