"""QLoRA with quax: fine-tune low-rank adapters on top of a 4-bit quantized model.

1. Train a small equinox MLP regressor in float32 on `y = sin(x @ p)`.
2. Quantize its linear weights to packed int4 with per-group scales
   (`quax.quantized.quantize_model`): a quarter of a byte per weight, plus scales.
3. `quax.lora.loraify` the quantized model and train only the adapters, with optax, on
   a shifted task `y = sin(x @ p) + shift`. Each `LoraArray`'s frozen weight is a
   `QuantizedArray`: the model's code is unchanged, and every matmul runs as the int4
   product (dequantized inside it) plus the two thin adapter products.
4. Check that the trained model equals its merged dense form, and report the losses
   and the bytes stored per weight.

Run `python examples/qlora.py` (about a minute on a laptop CPU), or with `--small`.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax

import quax


def _data(key, n, d_in, d_out, shift):
    kx, kp = jr.split(key)
    x = jr.normal(kx, (n, d_in))
    p = jr.normal(jr.key(7), (d_in, d_out)) / d_in**0.5  # the same task each time
    return x, jnp.sin(x @ p) + shift


def _fit(model, x, y, steps, lr, filter_spec):
    """Adam on the parts of `model` selected by `filter_spec`; returns the model and
    the losses."""
    params, static = eqx.partition(model, filter_spec)
    optim = optax.adam(lr)
    state = optim.init(params)

    @eqx.filter_jit
    def step(params, state):
        def loss(params):
            m = eqx.combine(params, static)
            return jnp.mean((jax.vmap(quax.quaxify(m))(x) - y) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(params)
        updates, state = optim.update(grads, state)
        return eqx.apply_updates(params, updates), state, value

    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    return eqx.combine(params, static), losses


def _weight_bytes(model) -> int:
    return sum(x.nbytes for x in jtu.tree_leaves(model) if eqx.is_array(x))


def main(
    *,
    width: int = 256,
    depth: int = 2,
    rank: int = 8,
    group_size: int = 64,
    n: int = 512,
    pretrain_steps: int = 300,
    finetune_steps: int = 200,
    quiet: bool = False,
) -> dict:
    """Pretrain, quantize, fine-tune adapters; returns the figures reported."""
    say = (lambda *a: None) if quiet else print
    d_in, d_out = 16, 4
    key = jr.key(0)
    model = eqx.nn.MLP(d_in, d_out, width, depth, key=key)
    x, y = _data(jr.key(1), n, d_in, d_out, shift=0.0)
    model, pre = _fit(model, x, y, pretrain_steps, 3e-3, eqx.is_inexact_array)
    say(f"pretrained: loss {pre[0]:.4f} -> {pre[-1]:.4f}")

    quantized = quax.quantized.quantize_model(model, bits=4, group_size=group_size)
    qlora = quax.lora.loraify(quantized, rank=rank, alpha=2.0 * rank, key=jr.key(2))
    x2, y2 = _data(jr.key(3), n, d_in, d_out, shift=0.5)
    start = float(jnp.mean((jax.vmap(quax.quaxify(qlora))(x2) - y2) ** 2))
    qlora, fine = _fit(qlora, x2, y2, finetune_steps, 1e-2, quax.lora.trainable(qlora))
    say(f"QLoRA fine-tune on the shifted task: loss {start:.4f} -> {fine[-1]:.4f}")

    merged = quax.lora.merge(qlora)
    max_diff = float(
        jnp.max(jnp.abs(jax.vmap(merged)(x2) - jax.vmap(quax.quaxify(qlora))(x2)))
    )
    adapters, _ = eqx.partition(qlora, quax.lora.trainable(qlora))
    out = {
        "pretrain_losses": pre,
        "finetune_losses": fine,
        "finetune_start": start,
        "max_diff": max_diff,
        "float_bytes": _weight_bytes(model),
        "quantized_bytes": _weight_bytes(quantized),
        "adapter_bytes": _weight_bytes(adapters),
    }
    say(
        f"stored weights: float32 {out['float_bytes']} B, int4 {out['quantized_bytes']}"
        f" B; adapters {out['adapter_bytes']} B; merged vs QLoRA max |diff| "
        f"{max_diff:.2e}"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny, fast run")
    args = parser.parse_args()
    if args.small:
        main(width=32, n=64, group_size=16, pretrain_steps=5, finetune_steps=5)
    else:
        main()
