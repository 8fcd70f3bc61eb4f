"""Sharded LoRA fine-tuning with quax on 8 devices (`make demo-sharded`).

The transformer of `lora_finetune.py`, loraified, fine-tuned with optax three ways,
from the same start and on the same batches:

1. on one device (the reference);
2. with `jax.jit` over an 8-device mesh: the frozen base weights FSDP-sharded (rows
   split over the mesh), the batch data-parallel, the adapters replicated. The model
   code is unchanged; `quax.leaf_shardings` says where each leaf of a `LoraArray` goes;
3. under `jax.shard_map` with explicit collectives: each device runs the quaxified
   model on its slice of the batch and the gradients are averaged with `pmean`.

It prints the losses of the three runs (they agree), and the per-device memory of the
sharded step against the single-device one, from XLA's compiled memory analysis.
On a machine without 8 accelerators it uses 8 CPU devices.
"""

import os


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402
from lora_finetune import Transformer, loss_and_accuracy, make_batch  # noqa: E402

import quax  # noqa: E402


def _is_lora(x) -> bool:
    return isinstance(x, quax.lora.LoraArray)


def shardings_for(model, mesh):
    """FSDP: every frozen weight with a first axis divisible by the mesh is split by
    rows; LoRA adapters and everything small are replicated."""
    n = mesh.devices.size
    replicated = NamedSharding(mesh, P())

    def leaf(x):
        if _is_lora(x):
            # The logical weight is split by rows; a LoraArray places `w` that way
            # (and would split `a` alike): we keep the adapters replicated instead.
            s = quax.leaf_shardings(x, NamedSharding(mesh, P("fsdp", None)))
            return eqx.tree_at(lambda t: (t.a, t.b), s, (replicated, replicated))
        if eqx.is_array(x) and x.ndim >= 2 and x.shape[0] % n == 0:
            return NamedSharding(mesh, P("fsdp", *[None] * (x.ndim - 1)))
        return replicated if eqx.is_array(x) else None

    return jtu.tree_map(leaf, model, is_leaf=_is_lora)


def make_step(static, optim, *, shard_map_mesh=None):
    def loss_fn(params, frozen, tokens, targets):
        model = eqx.combine(params, frozen, static)
        return loss_and_accuracy(model, tokens, targets)[0]

    def step(params, frozen, state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, tokens, targets)
        updates, state = optim.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    if shard_map_mesh is None:
        return jax.jit(step)

    def local_step(params, frozen, state, tokens, targets):
        # This device's slice of the batch; the mean over devices is the global mean.
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, tokens, targets)
        loss, grads = jax.lax.pmean((loss, grads), "fsdp")
        updates, state = optim.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    data = P("fsdp")
    return jax.jit(
        jax.shard_map(
            local_step,
            mesh=shard_map_mesh,
            in_specs=(P(), P(), P(), data, data),
            out_specs=(P(), P(), P()),
            # A quaxified function traced inside a `shard_map` body does not yet
            # carry JAX's varying-manual-axes types (see the README's "Many devices").
            check_vma=False,
        )
    )


def per_device_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def main(
    *,
    vocab=32,
    seq=16,
    width=128,
    depth=2,
    heads=4,
    rank=4,
    batch=64,
    steps=5,
    seed=0,
    quiet=False,
):
    start = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    if jax.device_count() < 8:
        raise RuntimeError(
            f"this demo needs 8 devices, found {jax.device_count()}: run it as a "
            "script (it asks for 8 CPU devices before JAX starts)."
        )
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    keys = jr.split(jr.key(seed), 3)
    model = Transformer(vocab, seq, width, depth, heads, key=keys[0])
    model = quax.lora.loraify(model, rank=rank, alpha=2 * rank, key=keys[1])
    # A nonzero `b`, so that the adapters already change the model at step 0.
    model = jtu.tree_map(
        lambda x: (
            eqx.tree_at(lambda t: t.b, x, 0.01 * jnp.ones_like(x.b))
            if _is_lora(x)
            else x
        ),
        model,
        is_leaf=_is_lora,
    )
    params, rest = eqx.partition(model, quax.lora.trainable(model))
    frozen, static = eqx.partition(rest, eqx.is_array)
    optim = optax.adam(1e-2)
    batches = [
        make_batch(k, batch, seq, vocab, shift=3) for k in jr.split(keys[2], steps)
    ]

    data = NamedSharding(mesh, P("fsdp"))

    def run(step, params, frozen, batch_sharding=None):
        """Compile `step` once (keeping the executable for its memory analysis), then
        train on the batches."""
        place = (lambda x, _: x) if batch_sharding is None else jax.device_put
        state = optim.init(params)
        tokens, targets = batches[0]
        args = (params, frozen, state, *place((tokens, targets), batch_sharding))
        compiled = step.lower(*args).compile()
        losses = []
        for tokens, targets in batches:
            tokens, targets = place((tokens, targets), batch_sharding)
            params, state, loss = compiled(params, frozen, state, tokens, targets)
            losses.append(float(loss))
        return losses, compiled

    say(f"1. One device ({jax.devices()[0].platform}), {steps} steps")
    losses_1, compiled_1 = run(make_step(static, optim), params, frozen)
    say("   losses: " + ", ".join(f"{x:.5f}" for x in losses_1))

    say("2. jax.jit over 8 devices: base weights FSDP-sharded, batch data-parallel")
    shardings = shardings_for(eqx.combine(params, frozen), mesh)
    params_8 = jax.device_put(params, _like(params, shardings))
    frozen_8 = jax.device_put(frozen, _like(frozen, shardings))
    losses_8, compiled_8 = run(make_step(static, optim), params_8, frozen_8, data)
    say("   losses: " + ", ".join(f"{x:.5f}" for x in losses_8))

    say("3. jax.shard_map over 8 devices, explicit pmean of the gradients")
    smap = make_step(static, optim, shard_map_mesh=mesh)
    losses_sm, _ = run(smap, params, frozen, data)
    say("   losses: " + ", ".join(f"{x:.5f}" for x in losses_sm))

    mem_1, mem_8 = per_device_bytes(compiled_1), per_device_bytes(compiled_8)
    frozen_bytes = sum(x.nbytes for x in jtu.tree_leaves(frozen))
    say(
        f"   per-device memory of one step: {mem_1 / 2**20:.2f} MiB on one device, "
        f"{mem_8 / 2**20:.2f} MiB per device on 8 ({mem_8 / mem_1:.2f}x); "
        f"frozen weights {frozen_bytes / 2**20:.2f} MiB in all"
    )
    elapsed = time.perf_counter() - start
    say(f"   demo took {elapsed:.0f} s")
    return dict(
        losses_1=losses_1,
        losses_8=losses_8,
        losses_shard_map=losses_sm,
        mem_1=mem_1,
        mem_8=mem_8,
        frozen_bytes=frozen_bytes,
        all_gathers=compiled_8.as_text().count("all-gather("),
        input_shardings=compiled_8.input_shardings,
    )


def _like(tree, shardings):
    """The entries of `shardings` (shaped like the whole model) for the arrays of
    `tree` (a partition of it)."""
    return jtu.tree_map(
        lambda x, s: s if eqx.is_array(x) else None,
        tree,
        shardings,
        is_leaf=lambda x: x is None,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    main(steps=args.steps)
