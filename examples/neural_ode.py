"""LoRA fine-tuning of a neural ODE with diffrax, through `quax.quaxify`.

The vector field is a plain `eqx.nn.MLP`; `quax.lora.loraify` swaps its weights for
`LoraArray`s (default: they refuse to materialise), and `diffrax.diffeqsolve` runs
unchanged inside `quax.quaxify`. Its gradients go through `jax.custom_vjp`
(`RecursiveCheckpointAdjoint`'s checkpointed loop, `BacksolveAdjoint`'s adjoint ODE)
or straight through the loop (`DirectAdjoint`): quax walks those rules with the LoRA
weights, so the matmuls stay low rank forwards and backwards.

For each adjoint, the adapters are trained with optax for a few steps, and at every
step the gradient is compared with that of the merged dense model (`quax.lora.merge`).

Run: `python examples/neural_ode.py [--steps 20] [--width 32]`.
"""

import argparse

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax

import quax


ADJOINTS = {
    "recursive_checkpoint": diffrax.RecursiveCheckpointAdjoint,
    "backsolve": diffrax.BacksolveAdjoint,
    "direct": diffrax.DirectAdjoint,
}


def solve(model, y0s, ts, adjoint, solver=None):
    """The trajectories of `dy/dt = model(y)` from each of `y0s`, saved at `ts`, as one
    ODE on the batch. The model is passed as `args`, so every adjoint
    (BacksolveAdjoint included) can differentiate it."""
    term = diffrax.ODETerm(lambda t, ys, model: jax.vmap(model)(ys))
    sol = diffrax.diffeqsolve(
        term,
        diffrax.Tsit5() if solver is None else solver,
        ts[0],
        ts[-1],
        dt0=(ts[-1] - ts[0]) / 8,
        y0=y0s,
        args=model,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.ConstantStepSize(),
        adjoint=adjoint,
    )
    return sol.ys


def loss_fn(model, y0s, ts, targets, adjoint, solver=None):
    ys = solve(model, y0s, ts, adjoint, solver)  # (time, batch, size)
    return jnp.mean((ys - targets) ** 2)


def data(key, n: int, size: int, ts):
    """Trajectories of a damped rotation: the task the adapters learn."""
    y0s = jr.normal(key, (n, size))
    rotation = jnp.array([[-0.1, 1.0], [-1.0, -0.1]])
    blocks = jnp.kron(jnp.eye(size // 2), rotation)
    flows = jax.vmap(lambda t: jax.scipy.linalg.expm(t * blocks))(ts)
    return y0s, jnp.einsum("tij,nj->tni", flows, y0s)  # (time, batch, size)


def train(
    adjoint_name: str,
    *,
    steps: int,
    width: int,
    depth: int = 2,
    size: int = 2,
    n: int = 4,
    solver: diffrax.AbstractSolver | None = None,
    seed: int = 0,
):
    """Train the adapters for `steps` steps; return the losses and, per step, the
    largest difference between the LoRA gradient and the merged dense model's."""
    adjoint = ADJOINTS[adjoint_name]()
    k_model, k_lora, k_data = jr.split(jr.key(seed), 3)
    mlp = eqx.nn.MLP(size, size, width, depth, activation=jnp.tanh, key=k_model)
    model = quax.lora.loraify(mlp, rank=2, key=k_lora)
    params, static = eqx.partition(model, quax.lora.trainable(model))
    ts = jnp.linspace(0.0, 1.0, 5)
    y0s, targets = data(k_data, n, size, ts)
    optim = optax.adam(1e-2)
    state = optim.init(params)

    def lora_loss(params):
        model = eqx.combine(params, static)
        return quax.quaxify(loss_fn)(model, y0s, ts, targets, adjoint, solver)

    def dense_loss(params):
        # The same adapters, merged into dense weights: the reference gradient.
        merged = quax.lora.merge(eqx.combine(params, static))
        return loss_fn(merged, y0s, ts, targets, adjoint, solver)

    @eqx.filter_jit
    def step(params, state):
        value, grads = jax.value_and_grad(lora_loss)(params)
        dense_value, dense_grads = jax.value_and_grad(dense_loss)(params)
        diff = jnp.max(
            jnp.stack(
                [
                    jnp.max(jnp.abs(g - d))
                    for g, d in zip(
                        jtu.tree_leaves(grads),
                        jtu.tree_leaves(dense_grads),
                        strict=True,
                    )
                ]
            )
        )
        updates, state = optim.update(grads, state)
        return eqx.apply_updates(params, updates), state, value, dense_value, diff

    losses, dense_losses, diffs = [], [], []
    for _ in range(steps):
        params, state, value, dense_value, diff = step(params, state)
        losses.append(float(value))
        dense_losses.append(float(dense_value))
        diffs.append(float(diff))
    return {"losses": losses, "dense_losses": dense_losses, "grad_diffs": diffs}


def main(steps: int = 20, width: int = 32) -> dict[str, dict[str, list[float]]]:
    results = {}
    for name in ADJOINTS:
        results[name] = r = train(name, steps=steps, width=width)
        print(
            f"{name:>20}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, "
            f"max |grad - dense grad| {max(r['grad_diffs']):.2e}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="LoRA fine-tuning of a neural ODE with diffrax."
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()
    main(args.steps, args.width)
