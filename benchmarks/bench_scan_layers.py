"""Question 3: `lax.scan` over stacked LoRA layers (one Linear per step, weights
stacked along axis 0 with `eqx.filter_vmap`, then LoRA'd: w is L x d x d, a and b
L x d x r and L x r x d). Trace time of the quaxified forward against the plain
stacked model, and whether a full weight is materialised: any `dot_general` or
`add` in the jaxpr (sub-jaxprs included) whose result ends in d x d is one, in the
forward and in the gradient with respect to the LoRA parameters.
"""

import equinox as eqx
import jax
import jax.extend.core as jexc
import jax.numpy as jnp
import jax.random as jr
from _adapters import clear_caches, lora_module, loraify, trainable
from _common import Results, interleave, main, ratios

import quax


def stacked_linears(layers: int, d: int, key):
    return eqx.filter_vmap(lambda k: eqx.nn.Linear(d, d, key=k))(jr.split(key, layers))


def forward(stack, x):
    params, static = eqx.partition(stack, eqx.is_array)

    def body(x, p):
        return jnp.tanh(eqx.combine(p, static)(x)), None

    return jax.lax.scan(body, x, params)[0]


def full_weights(closed, d: int) -> list[str]:
    """The equations (anywhere) that produce a d x d (or stacked d x d) result with a
    dot_general or an add: a materialised weight or weight gradient."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "add", "add_any"):
                for v in eqn.outvars:
                    if tuple(v.aval.shape[-2:]) == (d, d):
                        found.append(f"{eqn.primitive.name} -> {v.aval.str_short()}")
            for sub in jexc.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(closed.jaxpr)
    return found


def run(mode: str = "full") -> Results:
    layers, d = {"full": (16, 256), "quick": (16, 256), "tiny": (2, 16)}[mode]
    rounds = {"full": 15, "quick": 3, "tiny": 1}[mode]
    res = Results("scan_layers", f"scan over {layers} stacked LoRA layers, d={d}", mode)
    stack = stacked_linears(layers, d, jr.key(0))
    lora = loraify(stack, rank=8, key=jr.key(1))
    x = jnp.ones((d,), jnp.float32)
    try:
        jax.make_jaxpr(quax.quaxify(forward))(lora, x)
    except Exception as e:  # recorded, and measured again where it may materialise
        first_line = str(e).splitlines()[0] if str(e) else ""
        res.note(f"allow_materialise=False fails: {type(e).__name__}: {first_line}")
        lora = lora_module().loraify(
            stack, rank=8, key=jr.key(1), allow_materialise=True
        )
        res.add(
            "refuses",
            "fails without allow_materialise",
            True,
            target="False",
            met=False,
        )

    fwd_jaxpr = jax.make_jaxpr(quax.quaxify(forward))(lora, x)
    found = full_weights(fwd_jaxpr, d)
    desc = "forward: equations forming a d x d weight"
    res.add("fwd_full_weights", desc, len(found), target="0", met=not found)

    diff, static = eqx.partition(lora, trainable(lora))
    loss = lambda diff, x: jnp.sum(quax.quaxify(forward)(eqx.combine(diff, static), x))
    grad_jaxpr = jax.make_jaxpr(jax.grad(loss))(diff, x)
    gfound = full_weights(grad_jaxpr, d)
    desc = "gradient: equations forming a d x d weight"
    res.add("grad_full_weights", desc, len(gfound), target="0", met=not gfound)
    for f in (found + gfound)[:4]:
        res.note(f)

    variants = {
        "plain": lambda: jax.make_jaxpr(lambda s, x: forward(s, x))(stack, x),
        "quax": (
            clear_caches,
            lambda: jax.make_jaxpr(lambda s, x: quax.quaxify(forward)(s, x))(lora, x),
        ),
    }
    times = interleave(variants, rounds)
    res.add_time("plain_ms", "plain make_jaxpr", times["plain"])
    res.add_time("quax_ms", "quaxified, first trace", times["quax"])
    res.add_ratio("ratio", "quaxified / plain", ratios(times["quax"], times["plain"]))
    return res


if __name__ == "__main__":
    main(run)
