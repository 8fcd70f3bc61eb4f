"""LoRA fine-tuning with quax, end to end on the CPU (`make demo`).

1. Pretrain a small equinox transformer on a synthetic task: at each position, predict
   `(x[t] + x[t-1]) % vocab`.
2. `quax.lora.loraify` it and fine-tune only the adapters, with optax, on a shifted
   task: `(x[t] + x[t-1] + shift) % vocab`. The model code is unchanged: it runs
   through `quax.quaxify`, which routes every matmul with a LoRA weight to the
   low-rank rule `w·x + a·(b·x)`.
3. Merge the adapters into dense weights, check the merged model gives the same
   outputs, and save the loss curves to `demo_output/lora_finetune.png`.
"""

import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm import tqdm

import quax


# -- the model: a plain equinox transformer, unaware of quax -----------------------------


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, width: int, heads: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jr.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attn = eqx.nn.MultiheadAttention(heads, width, key=k1)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.up = eqx.nn.Linear(width, 2 * width, key=k2)
        self.down = eqx.nn.Linear(2 * width, width, key=k3)

    def __call__(self, h: Float[Array, "seq width"]) -> Float[Array, "seq width"]:
        seq = h.shape[0]
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        x = jax.vmap(self.norm1)(h)
        h = h + self.attn(x, x, x, mask=causal)
        x = jax.vmap(self.norm2)(h)
        return h + jax.vmap(lambda v: self.down(jax.nn.gelu(self.up(v))))(x)


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    position: Float[Array, "seq width"]
    blocks: tuple[Block, ...]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(
        self, vocab: int, seq: int, width: int, depth: int, heads: int, *, key
    ):
        keys = jr.split(key, depth + 3)
        self.embed = eqx.nn.Embedding(vocab, width, key=keys[0])
        self.position = 0.02 * jr.normal(keys[1], (seq, width))
        self.blocks = tuple(Block(width, heads, key=k) for k in keys[3:])
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, vocab, key=keys[2])

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq vocab"]:
        h = jax.vmap(self.embed)(tokens) + self.position
        for block in self.blocks:
            h = block(h)
        return jax.vmap(lambda v: self.head(self.norm(v)))(h)


# -- data and training -----------------------------------------------------------------


def make_batch(key: PRNGKeyArray, batch: int, seq: int, vocab: int, shift: int):
    tokens = jr.randint(key, (batch, seq), 0, vocab)
    previous = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    return tokens, (tokens + previous + shift) % vocab


def loss_and_accuracy(model, tokens, targets):
    # `quax.quaxify` is a no-op for a model without LoRA weights.
    logits = jax.vmap(quax.quaxify(model))(tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == targets)


def train(model, filter_spec, *, key, steps, lr, batch, seq, vocab, shift, desc, quiet):
    """Adam on the parts of `model` selected by `filter_spec`; returns the trained
    model and the loss at every step."""
    params, static = eqx.partition(model, filter_spec)
    optim = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.0)
    state = optim.init(params)

    @eqx.filter_jit
    def step(params, state, key):
        tokens, targets = make_batch(key, batch, seq, vocab, shift)

        def loss_fn(params):
            return loss_and_accuracy(eqx.combine(params, static), tokens, targets)[0]

        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, state = optim.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    losses = []
    bar = tqdm(jr.split(key, steps), desc=desc, disable=quiet, ncols=80)
    for step_key in bar:
        params, state, loss = step(params, state, step_key)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return eqx.combine(params, static), losses


def evaluate(model, *, key, seq, vocab, shift, batch=256):
    tokens, targets = make_batch(key, batch, seq, vocab, shift)
    loss, accuracy = eqx.filter_jit(loss_and_accuracy)(model, tokens, targets)
    return float(loss), float(accuracy)


def count(tree) -> int:
    return sum(x.size for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_array)))


# -- the demo --------------------------------------------------------------------------


def main(
    *,
    vocab=16,
    seq=12,
    width=64,
    depth=2,
    heads=4,
    rank=4,
    batch=64,
    pretrain_steps=600,
    finetune_steps=300,
    shift=3,
    out_dir="demo_output",
    quiet=False,
    seed=0,
):
    start = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    keys = jr.split(jr.key(seed), 6)
    sizes = dict(seq=seq, vocab=vocab)
    model = Transformer(vocab, seq, width, depth, heads, key=keys[0])

    say(f"1. Pretraining a {depth}-layer transformer on (x[t] + x[t-1]) % {vocab}")
    model, pretrain_losses = train(
        model, eqx.is_inexact_array, key=keys[1], steps=pretrain_steps, lr=3e-3,
        batch=batch, shift=0, desc="pretrain", quiet=quiet, **sizes,
    )  # fmt: skip
    pre_loss, pre_acc = evaluate(model, key=keys[2], shift=0, **sizes)
    say(f"   pretrained: loss {pre_loss:.3f}, accuracy {pre_acc:.1%}")

    say(
        f"2. LoRA (rank {rank}) on every Linear, fine-tuned on the task shifted by {shift}"
    )
    lora_model = quax.lora.loraify(model, rank=rank, alpha=2 * rank, key=keys[3])
    trainable = quax.lora.trainable(lora_model)
    n_train = count(eqx.filter(lora_model, trainable))
    n_total = count(lora_model)
    say(
        f"   trainable parameters: {n_train:,} of {n_total:,} ({n_train / n_total:.1%})"
    )
    before = evaluate(lora_model, key=keys[4], shift=shift, **sizes)
    lora_model, finetune_losses = train(
        lora_model, trainable, key=keys[5], steps=finetune_steps, lr=1e-2,
        batch=batch, shift=shift, desc="fine-tune (LoRA)", quiet=quiet, **sizes,
    )  # fmt: skip
    after = evaluate(lora_model, key=keys[4], shift=shift, **sizes)
    say(f"   shifted task before: loss {before[0]:.3f}, accuracy {before[1]:.1%}")
    say(f"   shifted task after:  loss {after[0]:.3f}, accuracy {after[1]:.1%}")
    frozen = [x.w for x in jtu.tree_leaves(lora_model, is_leaf=_is_lora) if _is_lora(x)]
    original = [
        lin.weight
        for lin in jtu.tree_leaves(model, is_leaf=_is_linear)
        if isinstance(lin, eqx.nn.Linear)
    ]
    unchanged = all(
        bool(jnp.all(a == b)) for a, b in zip(frozen, original, strict=True)
    )
    say(f"   pretrained weights unchanged: {unchanged}")

    say("3. Merging the adapters into dense weights")
    merged = quax.lora.merge(lora_model)
    tokens, _ = make_batch(keys[4], 32, seq, vocab, shift)
    lora_out = _batched_call(lora_model, tokens)  # LoraArrays: through quaxify
    merged_out = _batched_call(merged, tokens)  # plain arrays: quaxify is a no-op
    max_diff = float(jnp.max(jnp.abs(lora_out - merged_out)))
    say(f"   max |LoRA model - merged model| = {max_diff:.2e}")

    path = _plot(pretrain_losses, finetune_losses, out_dir)
    elapsed = time.perf_counter() - start
    say(f"   loss curves saved to {path}; demo took {elapsed:.0f} s")
    return dict(
        pretrain_losses=pretrain_losses,
        finetune_losses=finetune_losses,
        before=before,
        after=after,
        n_trainable=n_train,
        n_total=n_total,
        max_diff=max_diff,
        unchanged=unchanged,
        plot=path,
    )


@eqx.filter_jit
def _batched_call(model, tokens):
    return jax.vmap(quax.quaxify(model))(tokens)


def _is_lora(x) -> bool:
    return isinstance(x, quax.lora.LoraArray)


def _is_linear(x) -> bool:
    return isinstance(x, eqx.nn.Linear)


def _plot(pretrain_losses, finetune_losses, out_dir) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    n = len(pretrain_losses)
    ax.plot(range(n), pretrain_losses, label="pretrain (all weights)", lw=1)
    ax.plot(
        range(n, n + len(finetune_losses)),
        finetune_losses,
        label="fine-tune on the shifted task (LoRA adapters only)",
        lw=1,
    )
    ax.axvline(n, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title("quax: LoRA fine-tuning of a small transformer")
    ax.legend()
    fig.tight_layout()
    path = out / "lora_finetune.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--out-dir", default="demo_output")
    args = parser.parse_args()
    main(
        pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps,
        out_dir=args.out_dir,
    )
