"""`quax.quantized`: int8 and packed int4 weights, dequantized inside the products;
QLoRA (a `LoraArray` whose frozen weight is quantized) (issue 12.6)."""

import equinox as eqx
import jax
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from helpers import assert_matches_dense, tree_allclose, walked

import quax
from quax.lora import LoraArray, loraify, merge, trainable
from quax.quantized import QuantizedArray, dequantize, quantize, quantize_model


SCHEMES = [(8, None), (8, 4), (4, None), (4, 4)]
SCHEME_IDS = ["int8", "int8-g4", "int4", "int4-g4"]


@pytest.mark.parametrize("bits,group_size", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("axis", [0, -1])
def test_round_trip_within_half_a_step(bits, group_size, axis, getkey):
    w = jr.normal(getkey(), (8, 12))
    wq = quantize(w, bits=bits, group_size=group_size, axis=axis)
    assert wq.shape == w.shape and wq.dtype == w.dtype
    assert wq.q.dtype == jnp.int8
    n = w.shape[axis]
    packed = n // 2 if bits == 4 else n
    assert wq.q.shape[axis] == packed  # int4: two values per byte
    back = dequantize(wq)
    step = jnp.repeat(wq.scale, wq.group_size, axis=axis)
    assert jnp.all(jnp.abs(back - w) <= step / 2 + 1e-6)
    qmax = 2 ** (bits - 1) - 1
    # Each group's largest magnitude is represented exactly (absmax scaling).
    assert jnp.allclose(jnp.max(jnp.abs(back)), jnp.max(jnp.abs(w)), rtol=1e-6)
    assert jnp.all(jnp.abs(back / step) <= qmax + 1e-4)


def test_int4_packs_signed_nibbles():
    w = jnp.array([[-7.0, 7.0, -1.0, 0.0, 3.0, -4.0]])
    wq = quantize(w, bits=4)
    assert wq.q.shape == (1, 3)
    assert jnp.array_equal(dequantize(wq), w)  # scale 1: exact


def test_zero_group_has_a_finite_scale():
    wq = quantize(jnp.zeros((2, 4)), bits=8, group_size=2)
    assert jnp.all(jnp.isfinite(wq.scale)) and not jnp.any(dequantize(wq))


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="bits=8"):
        quantize(jnp.ones((2, 4)), bits=3)
    with pytest.raises(ValueError, match="must divide"):
        quantize(jnp.ones((2, 6)), bits=8, group_size=4)
    with pytest.raises(ValueError, match="even for 4 bits"):
        quantize(jnp.ones((2, 6)), bits=4, group_size=3)
    with pytest.raises(ValueError, match="floating"):
        quantize(jnp.ones((2, 4), jnp.int32))


# -- products against the dense (dequantized) weight -----------------------------------


def _products(w, x, xt):
    return {
        "w_at_x": w @ x,  # eqx Linear: contracts axis 1 (the quantization axis)
        "x_at_wT": xt @ w.T,
        "batched": jnp.einsum("oi,bi->bo", w, xt),
        "scaled": (2.0 * w) @ x,
        "neg": (-w) @ x,
        "half": w.astype(jnp.bfloat16).astype(jnp.float32) @ x,
    }


@pytest.mark.parametrize("bits,group_size", SCHEMES, ids=SCHEME_IDS)
def test_products_match_dequantized(bits, group_size, mode, getkey):
    wq = quantize(jr.normal(getkey(), (6, 8)), bits=bits, group_size=group_size)
    x, xt = jr.normal(getkey(), (8,)), jr.normal(getkey(), (3, 8))
    assert_matches_dense(_products, wq, x, xt, mode=mode, rtol=2e-2, atol=2e-2)


def test_other_contractions_materialise_correctly(getkey):
    wq = quantize(jr.normal(getkey(), (6, 8)), bits=8, axis=-1)
    x = jr.normal(getkey(), (6,))
    # Contracts axis 0, not the quantization axis: declined, then dequantized.
    assert_matches_dense(lambda w, x: x @ w, wq, x)
    assert_matches_dense(lambda w: jnp.exp(w), wq)


def test_handlers_keep_the_type(getkey):
    wq = quantize(jr.normal(getkey(), (6, 8)), bits=4, group_size=4)
    for fn in (lambda w: w.T, lambda w: -w, lambda w: 3.0 * w):
        out = quax.quaxify(fn)(wq)
        assert isinstance(out, QuantizedArray) and out.q.dtype == jnp.int8
        assert tree_allclose(dequantize(out), fn(dequantize(wq)), rtol=1e-5)
    out = quax.quaxify(lambda w: w.astype(jnp.bfloat16))(wq)
    assert isinstance(out, QuantizedArray) and out.dtype == jnp.bfloat16


def _float_arrays_of_shape(closed, shape):
    """Equations producing a floating array of `shape`, with their consumers."""
    found = []

    def visit(jaxpr):
        users: dict = {}
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if not isinstance(v, jexc.Literal):
                    users.setdefault(v, []).append(eqn.primitive.name)
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                aval = v.aval
                if getattr(aval, "shape", None) == shape and jnp.issubdtype(
                    aval.dtype, jnp.floating
                ):
                    found.append((eqn.primitive.name, tuple(users.get(v, ()))))
            for sub in jexc.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(closed.jaxpr)
    return found


def test_per_channel_product_converts_only_as_the_dot_operand(getkey):
    wq = quantize(jr.normal(getkey(), (16, 24)), bits=4)
    x = jr.normal(getkey(), (24, 3))
    closed = walked(jax.make_jaxpr(quax.quaxify(lambda w, x: w @ x))(wq, x))
    found = _float_arrays_of_shape(closed, (16, 24))
    # The only full-size float is the integers converted, consumed by the dot alone.
    assert found == [("convert_element_type", ("dot_general",))], found


# -- QLoRA ---------------------------------------------------------------------------------


def _qlora_mlp(key, bits=4, group_size=None):
    k1, k2 = jr.split(key)
    mlp = eqx.nn.MLP(8, 4, 16, 1, key=k1)
    model = quantize_model(mlp, bits=bits, group_size=group_size)
    model = loraify(model, rank=2, key=k2, scale=0.5)
    # b != 0, so the update matters.
    return jtu.tree_map(
        lambda x: (
            eqx.tree_at(lambda m: m.b, x, 0.1 * jnp.ones_like(x.b))
            if isinstance(x, LoraArray)
            else x
        ),
        model,
        is_leaf=lambda x: isinstance(x, LoraArray),
    )


def _dense_lora(model):
    """The same model with each quantized weight dequantized (a plain LoRA model)."""
    return jtu.tree_map(
        lambda x: dequantize(x) if isinstance(x, QuantizedArray) else x,
        model,
        is_leaf=lambda x: isinstance(x, QuantizedArray),
    )


def _loss(model, x, y):
    pred = jax.vmap(quax.quaxify(model))(x)
    return jnp.mean((pred - y) ** 2)


@pytest.mark.parametrize(
    "bits,group_size", [(8, None), (4, 4)], ids=["int8", "int4-g4"]
)
def test_qlora_matches_merged_dense_model_and_its_gradients(bits, group_size, getkey):
    model = _qlora_mlp(getkey(), bits, group_size)
    lora = model.layers[0].weight
    assert isinstance(lora, LoraArray) and isinstance(lora.w, QuantizedArray)
    x, y = jr.normal(getkey(), (5, 8)), jr.normal(getkey(), (5, 4))
    got = jax.vmap(quax.quaxify(model))(x)
    assert tree_allclose(got, jax.vmap(merge(model))(x), rtol=1e-4, atol=1e-4)
    params, static = eqx.partition(model, trainable(model))
    g = jax.jit(jax.grad(lambda p: _loss(eqx.combine(p, static), x, y)))(params)
    dense = _dense_lora(model)
    dparams, dstatic = eqx.partition(dense, trainable(dense))
    g_dense = jax.grad(lambda p: _loss(eqx.combine(p, dstatic), x, y))(dparams)
    g, g_dense = jtu.tree_leaves(g), jtu.tree_leaves(g_dense)  # a and b of each
    assert len(g) == len(g_dense) == 4
    assert all(
        np.allclose(u, v, rtol=1e-4, atol=1e-5) for u, v in zip(g, g_dense, strict=True)
    )


def test_qlora_training_step_never_forms_a_float_weight(getkey):
    # Distinctive sizes: a (16, 24) float in the step's program may only be the
    # integers converted as a product's operand (fused into the matmul by XLA).
    k1, k2 = jr.split(getkey())
    model = quantize_model(eqx.nn.Linear(24, 16, key=k1), bits=4)
    model = loraify(model, rank=2, key=k2)
    params, static = eqx.partition(model, trainable(model))
    x = jr.normal(getkey(), (3, 24))
    optim = optax.adam(1e-2)

    def step(params, state):
        def loss(p):
            return jnp.sum(jax.vmap(quax.quaxify(eqx.combine(p, static)))(x) ** 2)

        grads = jax.grad(loss)(params)
        updates, state = optim.update(grads, state)
        return optax.apply_updates(params, updates), state

    closed = jax.make_jaxpr(step)(params, optim.init(params))
    found = _float_arrays_of_shape(closed, (16, 24))
    assert found, "the quantized product should appear in the step"
    assert all(
        prim == "convert_element_type" and set(users) == {"dot_general"}
        for prim, users in found
    ), found


def test_qlora_trains(getkey):
    model = _qlora_mlp(getkey())
    params, static = eqx.partition(model, trainable(model))
    x = jr.normal(getkey(), (16, 8))
    y = jnp.sin(x[:, :4])
    optim = optax.adam(3e-2)
    state = optim.init(params)

    @eqx.filter_jit
    def step(params, state):
        loss, grads = eqx.filter_value_and_grad(
            lambda p: _loss(eqx.combine(p, static), x, y)
        )(params)
        updates, state = optim.update(grads, state)
        return eqx.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.all(np.isfinite(losses))


def test_lora_on_quantized_keeps_structure_through_handlers(getkey):
    wq = quantize(jr.normal(getkey(), (6, 8)), bits=8)
    lora = LoraArray(wq, rank=2, key=getkey(), scale=1.0)
    lora = eqx.tree_at(lambda m: m.b, lora, jr.normal(getkey(), (2, 8)))
    for fn in (lambda w: w.T, lambda w: -w, lambda w: 2.0 * w, lambda w: w / 2.0):
        out = quax.quaxify(fn)(lora)
        assert isinstance(out, LoraArray) and isinstance(out.w, QuantizedArray)
        assert tree_allclose(merge(out), fn(merge(lora)), rtol=1e-5, atol=1e-5)
    x = jr.normal(getkey(), (8,))
    got = quax.quaxify(lambda w, x: lax.dot_general(w, x, (((1,), (0,)), ((), ()))))(
        lora, x
    )
    assert tree_allclose(got, merge(lora) @ x, rtol=1e-5, atol=1e-5)


def test_example_runs_small():
    # `examples/qlora.py --small`: pretrain, quantize to int4, fine-tune, merge.
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples/qlora.py"
    spec = importlib.util.spec_from_file_location("qlora_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(
        width=16, n=32, group_size=8, pretrain_steps=2, finetune_steps=3, quiet=True
    )
    assert len(out["finetune_losses"]) == 3
    assert np.all(np.isfinite(out["finetune_losses"]))
    assert out["max_diff"] < 1e-4
    assert out["quantized_bytes"] < out["float_bytes"] / 2
