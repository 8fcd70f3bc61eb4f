"""Question 5: eager latency. A warm `quaxify(model)(x)` call (no outer `jax.jit`)
against the plain model called eagerly and against a warm `jax.jit` of the plain
(dense) model, all three in the same rounds.

The models are LoRA'd (every Linear) where the library has LoRA, else carry one
rule-less `Box` weight (materialised where it is used). The jitted dense model takes
its parameters as arguments (`eqx.partition`), as `eqx.filter_jit` does. For the MLP,
also both eager calls under `jax.disable_jit()`, where quax walks op by op.
"""

import equinox as eqx
import jax
import jax.random as jr
from _adapters import Box, have_lora, loraify
from _common import (
    Results,
    Transformer,
    block,
    interleave,
    main,
    mlp,
    ratios,
    tokens,
)

import quax


def valueify(model, key):
    if have_lora():
        return loraify(model, rank=8, key=key)
    return eqx.tree_at(
        lambda m: first_linear(m).weight, model, Box(first_linear(model).weight)
    )


def first_linear(model) -> eqx.nn.Linear:
    is_linear = lambda x: isinstance(x, eqx.nn.Linear)
    return next(x for x in jax.tree.leaves(model, is_leaf=is_linear) if is_linear(x))


#: name -> (depth, width) of the MLP cases.
MLPS = {"mlp": (8, 512), "mlp_tiny": (1, 8), "mlp4096": (8, 4096)}


def case(name: str, key):
    """(model, input, description) of one case."""
    if name in MLPS:
        depth, width = MLPS[name]
        return mlp(depth, width, key=key), jax.numpy.ones(width), f"MLP {depth}x{width}"
    return Transformer(12, 256, key=key), tokens(128), "transformer 12x256"


def run(mode: str = "full", cases: list[tuple[str, int]] | None = None) -> Results:
    """`cases` (name, rounds) default to those of `mode`; `bench_gpu.py` adds an MLP
    of width 4096."""
    kind = "LoRA'd" if have_lora() else "one Box weight"
    res = Results("eager", f"warm eager calls ({kind})", mode)
    key = jr.key(0)
    if cases is None:
        cases = {
            "full": [("mlp", 21), ("transformer", 7)],
            "quick": [("mlp", 5), ("transformer", 2)],
            "tiny": [("mlp_tiny", 1)],
        }[mode]
    for name, rounds in cases:
        model, x, desc = case(name, key)
        vmodel = valueify(model, jr.key(1))
        qmodel = quax.quaxify(vmodel)
        params, static = eqx.partition(model, eqx.is_array)
        jitted = jax.jit(lambda p, x, static=static: eqx.combine(p, static)(x))
        # The same LoRA program compiled by an outer jit: what is left of the eager
        # call's cost beyond it is Python overhead per call.
        vparams, vstatic = eqx.partition(vmodel, eqx.is_array)
        qjitted = jax.jit(lambda p, x, s=vstatic: quax.quaxify(eqx.combine(p, s))(x))
        block(jitted(params, x))
        block(qjitted(vparams, x))
        block(qmodel(x))  # warm: traces (and, if it does, compiles) once
        variants = {
            "plain_eager": lambda model=model, x=x: block(model(x)),
            "quax": lambda qmodel=qmodel, x=x: block(qmodel(x)),
            "jit": lambda jitted=jitted, p=params, x=x: block(jitted(p, x)),
            "jit_quax": lambda f=qjitted, p=vparams, x=x: block(f(p, x)),
        }
        if name in ("mlp", "mlp_tiny"):
            # The op-by-op path: `jax.disable_jit()` turns every compiled call off.
            variants["plain_nojit"] = lambda model=model, x=x: nojit(model, x)
            variants["quax_nojit"] = lambda qmodel=qmodel, x=x: nojit(qmodel, x)
        times = interleave(variants, rounds, number=3 if name in MLPS else 1)
        res.add_time(f"{name}_jit_ms", f"{desc}: jax.jit(dense), warm", times["jit"])
        res.add_time(f"{name}_eager_ms", f"{desc}: plain eager", times["plain_eager"])
        res.add_time(
            f"{name}_quax_ms", f"{desc}: quaxify(model)(x), warm", times["quax"]
        )
        target = 1.2 if name != "mlp_tiny" else None
        res.add_ratio(
            f"{name}_vs_jit",
            f"{desc}: quaxify / jit",
            ratios(times["quax"], times["jit"]),
            target,
        )
        res.add_time(
            f"{name}_jit_quax_ms",
            f"{desc}: jax.jit(quaxify(model)), warm",
            times["jit_quax"],
        )
        res.add_ratio(
            f"{name}_lora_program",
            f"{desc}: jax.jit(quaxify) / jax.jit(dense)",
            ratios(times["jit_quax"], times["jit"]),
        )
        res.add_ratio(
            f"{name}_vs_jit_quax",
            f"{desc}: quaxify / jax.jit(quaxify)",
            ratios(times["quax"], times["jit_quax"]),
        )
        res.add_ratio(
            f"{name}_vs_eager",
            f"{desc}: quaxify / plain eager",
            ratios(times["quax"], times["plain_eager"]),
        )
        if "quax_nojit" in times:
            res.add_ratio(
                f"{name}_nojit_vs_eager",
                f"{desc}: under jax.disable_jit(), quaxify / plain",
                ratios(times["quax_nojit"], times["plain_nojit"]),
            )
    return res


def nojit(fn, x):
    with jax.disable_jit():
        return block(fn(x))


if __name__ == "__main__":
    main(run)
