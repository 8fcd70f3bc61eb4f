"""`quax.lora`: LoraArray's low-rank handlers, loraify, merge, trainable (issue 4)."""

import re

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
from helpers import run_mode, tree_allclose, walked
from hypothesis import given, settings, strategies as st

import quax
from quax.lora import LoraArray, loraify, merge, trainable


def _lora(key, shape=(3, 4), rank=2, **kwargs):
    """A LoraArray with a random `b`, so that `a @ b` is not zero."""
    kw, ka, kb = jr.split(key, 3)
    *batch, _, m = shape
    lora = LoraArray(jr.normal(kw, shape), rank=rank, key=ka, scale=1.0, **kwargs)
    return eqx.tree_at(lambda x: x.b, lora, jr.normal(kb, (*batch, rank, m)))


def _dense(lora):
    return merge(lora)


def _check(fn, lora, *args, mode="eager", rtol=1e-5, atol=1e-5):
    """`quaxify(fn)` on a LoraArray that refuses to materialise equals `fn` on its
    dense matrix: the handlers kept the low-rank structure the whole way."""
    argnum = 1 if args else None  # in "grad" mode: with respect to the plain operand
    got = run_mode(fn, (lora, *args), mode, quaxed=True, argnum=argnum)
    expected = run_mode(fn, (_dense(lora), *args), mode, quaxed=False, argnum=argnum)
    assert tree_allclose(got, expected, rtol=rtol, atol=atol), (got, expected)
    return got


# -- dot_general -----------------------------------------------------------------------

MATMULS = {
    "w_at_x": (lambda w, x: w @ x, (4,)),
    "x_at_w": (lambda w, x: x @ w, (3,)),
    "batched_x_at_wT": (lambda w, x: x @ w.T, (5, 4)),
    "wT_at_batched": (lambda w, x: w.T @ x, (3, 5)),
    "contract_both": (lambda w, x: jnp.einsum("nm,nm->", w, x), (3, 4)),
    "row_dot": (lambda w, x: jnp.einsum("nm,nm->n", w, x), (3, 4)),
    "col_dot": (lambda w, x: jnp.einsum("nm,mn->m", w, x), (4, 3)),
    "linear_layer": (lambda w, x: jnp.tanh(x @ w.T * 2.0) @ w, (5, 4)),
}


def test_matmuls_stay_low_rank(mode, getkey):
    # Every case in one program per mode: one trace and one compilation.
    lora = _lora(getkey())
    xs = {name: jr.normal(getkey(), shape) for name, (_, shape) in MATMULS.items()}

    def every_case(w, xs):
        return {name: fn(w, xs[name]) for name, (fn, _) in MATMULS.items()}

    _check(every_case, lora, xs, mode=mode)


def test_lora_operand_traces_to_thin_products(getkey):
    lora = _lora(getkey(), shape=(16, 24), rank=2)
    x = jr.normal(getkey(), (24,))
    closed = walked(jax.make_jaxpr(quax.quaxify(lambda w, x: w @ x))(lora, x))
    shapes = [
        v.aval.shape
        for e in closed.jaxpr.eqns
        if e.primitive is not lax.stop_gradient_p  # an alias of w, not a new array
        for v in e.outvars
    ]
    assert (16, 24) not in shapes  # a @ b is never formed
    dots = [e for e in closed.jaxpr.eqns if e.primitive is lax.dot_general_p]
    assert len(dots) == 3  # w·x, b·x, a·(b·x)


def _dot_case(draw):
    """Random `dot_general` dimension numbers with a (maybe batched) LoRA operand:
    each axis of the LoRA is contracted, batched or free, at least one matrix axis is
    contracted, and the plain operand's axes come in a random order."""
    n_batch = draw(st.integers(0, 1))
    lora_shape = (2,) * n_batch + (3, 4)
    k = len(lora_shape)
    roles = [draw(st.sampled_from(["contract", "batch", "free"])) for _ in range(k)]
    if "contract" not in roles[-2:]:
        roles[draw(st.sampled_from([k - 2, k - 1]))] = "contract"
    n_extra = draw(st.integers(0, 2))
    x_axes = [i for i, r in enumerate(roles) if r != "free"] + [None] * n_extra
    x_axes = draw(st.permutations(x_axes))
    x_shape = tuple(5 if i is None else lora_shape[i] for i in x_axes)
    contract = [i for i, r in enumerate(roles) if r == "contract"]
    batch = [i for i, r in enumerate(roles) if r == "batch"]
    c_pairs = (tuple(contract), tuple(x_axes.index(i) for i in contract))
    b_pairs = (tuple(batch), tuple(x_axes.index(i) for i in batch))
    return lora_shape, x_shape, c_pairs, b_pairs


@settings(max_examples=25, deadline=None)
@given(case=st.composite(_dot_case)(), lora_on_left=st.booleans())
def test_odd_dimension_numbers(case, lora_on_left):
    lora_shape, x_shape, (lc, xc), (lb, xb) = case
    lora = _lora(jr.key(len(lora_shape)), shape=lora_shape)
    x = jr.normal(jr.key(1), x_shape)
    if lora_on_left:
        fn = lambda w, x: lax.dot_general(w, x, ((lc, xc), (lb, xb)))
    else:
        fn = lambda w, x: lax.dot_general(x, w, ((xc, lc), (xb, lb)))
    _check(fn, lora, x, rtol=1e-4, atol=1e-4)


def test_batched_lora_under_vmap(getkey):
    lora = _lora(getkey(), shape=(2, 3, 4))
    x = jr.normal(getkey(), (2, 4))
    fn = jax.vmap(lambda w, x: w @ x)
    _check(fn, lora, x, mode="jit_outside")


def test_no_matrix_axis_contracted_refuses_to_materialise(getkey):
    lora = _lora(getkey())
    outer = lambda w, x: lax.dot_general(w, x, (((), ()), ((), ())))
    with pytest.raises(
        quax.NoHandlerError, match=r"(?s)`dot_general`.*allow_materialise"
    ):
        quax.quaxify(outer)(lora, jnp.ones(2))


# -- structure-keeping handlers --------------------------------------------------------

KEEPS_TYPE = {
    "transpose": lambda w: w.T,
    "neg": lambda w: -w,
    "mul_scalar": lambda w: w * 3.0,
    "rmul_scalar": lambda w: jnp.asarray(2.0) * w,
    "div_scalar": lambda w: w / 4.0,
    "to_float16": lambda w: w.astype(jnp.float16),
    "chain": lambda w: -(2.0 * w.T) / 3.0,
}


@pytest.mark.parametrize("name", sorted(KEEPS_TYPE))
def test_handler_keeps_lora_type(name, getkey):
    lora = _lora(getkey())
    fn = KEEPS_TYPE[name]
    out = quax.quaxify(fn)(lora)
    assert isinstance(out, LoraArray)
    assert out.rank == 2
    expected = fn(_dense(lora))
    assert out.dtype == expected.dtype
    got = _dense(out).astype(jnp.float32)
    assert tree_allclose(got, expected.astype(jnp.float32), rtol=1e-2, atol=1e-2)


def test_handlers_then_matmul_match_dense(mode, getkey):
    lora = _lora(getkey())
    x = jr.normal(getkey(), (5, 4))

    def every_case(w, x):
        out = {}
        for name, fn in KEEPS_TYPE.items():
            v = fn(w)
            v = v.T if name in ("transpose", "chain") else v
            out[name] = (x.astype(v.dtype) @ v.T).astype(jnp.float32)
        return out

    _check(every_case, lora, x, mode=mode, rtol=1e-2, atol=1e-2)


def test_batched_transpose_keeps_type(getkey):
    lora = _lora(getkey(), shape=(2, 3, 4))
    for perm in [(0, 2, 1), (0, 1, 2)]:
        out = quax.quaxify(lambda w, p=perm: jnp.transpose(w, p))(lora)
        assert isinstance(out, LoraArray)
        assert tree_allclose(_dense(out), jnp.transpose(_dense(lora), perm))


def test_other_ops_refuse_to_materialise(getkey):
    lora = _lora(getkey())
    msg = r"(?s)`exp`.*LoraArray.*allow_materialise=True"
    with pytest.raises(quax.NoHandlerError, match=msg):
        quax.quaxify(jnp.exp)(lora)


def test_other_ops_materialise_when_allowed(mode, getkey):
    lora = _lora(getkey(), allow_materialise=True)
    _check(lambda w, x: jnp.exp(w) * x, lora, jr.normal(getkey(), (3, 4)), mode=mode)


def test_bad_arguments_say_what_was_expected(getkey):
    with pytest.raises(ValueError, match=r"`weight` of shape \(\*batch, n, m\)"):
        LoraArray(jnp.ones(3), rank=1, key=getkey())
    with pytest.raises(ValueError, match="positive int `rank`"):
        LoraArray(jnp.ones((3, 4)), rank=0, key=getkey())


# -- gradients -----------------------------------------------------------------------


def _mlp(key, sizes=(4, 8, 2)):
    return eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], len(sizes) - 2, key=key)


def _loss(model, x, y):
    pred = jax.vmap(quax.quaxify(model))(x)
    return jnp.mean((pred - y) ** 2)


def test_gradients_reach_only_the_adapters(getkey):
    model = loraify(_mlp(getkey()), rank=2, key=getkey())
    model = jtu.tree_map(
        lambda x: (
            eqx.tree_at(lambda m: m.b, x, jnp.ones_like(x.b)) if _is_lora(x) else x
        ),
        model,
        is_leaf=_is_lora,
    )
    x, y = jr.normal(getkey(), (6, 4)), jr.normal(getkey(), (6, 2))
    grads = eqx.filter_grad(_loss)(model, x, y)
    loras = [g for g in jtu.tree_leaves(grads, is_leaf=_is_lora) if _is_lora(g)]
    assert len(loras) == 2
    for g in loras:
        assert not jnp.any(g.w)
        assert jnp.any(g.a) and jnp.any(g.b)


@pytest.mark.parametrize("name", ["mul_scalar", "div_scalar", "chain"])
def test_scalar_scaling_keeps_w_frozen_but_differentiates_the_scalar(name, getkey):
    # quax#4 (dense-equivalence finding): `c * lora` folds `c` into `w`; d/dc must
    # still see `c * w`, while `w` itself gets no gradient.
    lora = _lora(getkey(), allow_materialise=True)
    fn = KEEPS_TYPE[name]

    def loss(lora, c):
        return jnp.sum(quax.quaxify(lambda w, c: fn(w) * c)(lora, c).materialise())

    g_lora, g_c = jax.grad(loss, argnums=(0, 1))(lora, jnp.asarray(1.5))
    assert not jnp.any(g_lora.w)
    dense = _dense(lora)
    expected = jax.grad(lambda c: jnp.sum(fn(dense) * c))(jnp.asarray(1.5))
    assert jnp.allclose(g_c, expected, rtol=1e-5)


def test_gradients_reach_w_without_stop_gradient(getkey):
    model = loraify(_mlp(getkey()), rank=2, key=getkey(), stop_gradient=False)
    x, y = jr.normal(getkey(), (6, 4)), jr.normal(getkey(), (6, 2))
    grads = eqx.filter_grad(_loss)(model, x, y)
    assert jnp.any(grads.layers[0].weight.w)


def _is_lora(x):
    return isinstance(x, LoraArray)


def test_adapter_gradient_allocates_nothing_of_the_weight_size(getkey):
    # Distinctive sizes: nothing in the gradient program may have w's shape (16, 24).
    model = loraify(eqx.nn.Linear(24, 16, key=getkey()), rank=2, key=getkey())
    params, static = eqx.partition(model, trainable(model))
    x = jr.normal(getkey(), (3, 24))

    def loss(params):
        return jnp.sum(jax.vmap(quax.quaxify(eqx.combine(params, static)))(x) ** 2)

    closed = jax.make_jaxpr(jax.grad(loss))(params)
    avals = [
        v.aval
        for e in _all_eqns(closed.jaxpr)
        if e.primitive is not lax.stop_gradient_p  # an alias of w, not a new array
        for v in e.outvars
    ]
    assert all(getattr(a, "size", 0) < 16 * 24 for a in avals), avals


def test_full_model_gradient_computes_nothing_for_frozen_w(getkey):
    # Differentiating the whole model returns a zero gradient for w (JAX instantiates
    # it), but no product of w's size is computed for it.
    model = loraify(eqx.nn.Linear(24, 16, key=getkey()), rank=2, key=getkey())
    x = jr.normal(getkey(), (3, 24))

    def loss(model):
        return jnp.sum(jax.vmap(quax.quaxify(model))(x) ** 2)

    closed = jax.make_jaxpr(eqx.filter_grad(loss))(model)
    big = [
        e
        for e in _all_eqns(closed.jaxpr)
        if e.primitive not in (lax.broadcast_in_dim_p, lax.stop_gradient_p)
        and any(getattr(v.aval, "size", 0) >= 16 * 24 for v in e.outvars)
    ]
    assert not big, big


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jexc.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


# -- loraify, trainable, merge ---------------------------------------------------------


def test_loraify_replaces_every_linear_including_attention(getkey):
    attn = eqx.nn.MultiheadAttention(2, 8, key=getkey())
    model = (attn, _mlp(getkey()))
    lora_model = loraify(model, rank=2, key=getkey())
    weights = [
        lin.weight
        for lin in jtu.tree_leaves(
            lora_model, is_leaf=lambda x: isinstance(x, eqx.nn.Linear)
        )
        if isinstance(lin, eqx.nn.Linear)
    ]
    assert len(weights) == 6 and all(_is_lora(w) for w in weights)
    q = jr.normal(getkey(), (5, 8))
    got = quax.quaxify(lora_model[0])(q, q, q)
    assert tree_allclose(got, attn(q, q, q), atol=1e-2)  # b = 0: nothing changed yet


@pytest.mark.parametrize(
    "where",
    [
        lambda layer: layer.in_features == layer.out_features,
        ["query_proj", "value_proj", "1.layers.1"],
        r"0\.(query|value)_proj|1\.layers\.1",
    ],
    ids=["predicate", "target_list", "regex"],
)
def test_loraify_where_selects_layers(where, getkey):
    model = (
        eqx.nn.MultiheadAttention(2, 8, key=getkey()),
        _mlp(getkey(), (4, 8, 8, 2)),
    )
    out = loraify(model, rank=2, key=getkey(), where=where)
    attn, mlp = out
    adapted = {
        "query_proj": _is_lora(attn.query_proj.weight),
        "key_proj": _is_lora(attn.key_proj.weight),
        "value_proj": _is_lora(attn.value_proj.weight),
        "output_proj": _is_lora(attn.output_proj.weight),
        "mlp0": _is_lora(mlp.layers[0].weight),
        "mlp1": _is_lora(mlp.layers[1].weight),
        "mlp2": _is_lora(mlp.layers[2].weight),
    }
    if isinstance(where, str | list):
        expected = {"query_proj", "value_proj", "mlp1"}
    else:
        expected = {"query_proj", "key_proj", "value_proj", "output_proj", "mlp1"}
    assert {k for k, v in adapted.items() if v} == expected


def test_loraify_rejects_bad_where(getkey):
    with pytest.raises(TypeError, match=re.escape("loraify(where=...)")):
        loraify(_mlp(getkey()), rank=2, key=getkey(), where=3)  # pyright: ignore[reportArgumentType]


def test_alpha_scales_the_update(getkey):
    lin = eqx.nn.Linear(4, 3, key=getkey())
    lora = loraify(lin, rank=2, alpha=8.0, key=getkey()).weight
    assert lora.scaling == 4.0
    lora = eqx.tree_at(lambda x: x.b, lora, jnp.ones_like(lora.b))
    assert tree_allclose(merge(lora), lora.w + 4.0 * lora.a @ lora.b)
    _check(lambda w, x: w @ x, lora, jnp.ones(4))


def test_trainable_selects_exactly_a_and_b(getkey):
    model = loraify(_mlp(getkey()), rank=2, key=getkey())
    params, static = eqx.partition(model, trainable(model))
    kept = jtu.tree_leaves(params)
    adapters = [
        leaf
        for lora in jtu.tree_leaves(model, is_leaf=_is_lora)
        if _is_lora(lora)
        for leaf in (lora.a, lora.b)
    ]
    assert len(kept) == len(adapters) == 4
    assert all(k is a for k, a in zip(kept, adapters, strict=True))
    assert eqx.combine(params, static) == model


def test_merge_round_trip(getkey):
    model = loraify(_mlp(getkey()), rank=2, key=getkey())
    model = jtu.tree_map(
        lambda x: (
            eqx.tree_at(lambda m: m.b, x, 0.1 * jnp.ones_like(x.b))
            if _is_lora(x)
            else x
        ),
        model,
        is_leaf=_is_lora,
    )
    merged = merge(model)
    assert not any(_is_lora(x) for x in jtu.tree_leaves(merged, is_leaf=_is_lora))
    x = jr.normal(getkey(), (6, 4))
    got = jax.vmap(merged)(x)
    assert tree_allclose(got, jax.vmap(quax.quaxify(model))(x), atol=1e-5)


def test_training_loop_reduces_loss(getkey):
    model = loraify(_mlp(getkey()), rank=2, key=getkey())
    params, static = eqx.partition(model, trainable(model))
    x = jr.normal(getkey(), (16, 4))
    y = jnp.sin(x[:, :2])
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
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


# -- mixed precision -----------------------------------------------------------------


@pytest.mark.parametrize("adapter_dtype", [jnp.float32, jnp.bfloat16])
def test_mixed_precision(adapter_dtype, getkey):
    lin = eqx.nn.Linear(8, 4, key=getkey())
    lin = jtu.tree_map(lambda x: x.astype(jnp.bfloat16) if eqx.is_array(x) else x, lin)
    lora = loraify(lin, rank=2, key=getkey(), dtype=adapter_dtype, scale=1.0)
    lora = eqx.tree_at(lambda m: m.weight.b, lora, jnp.ones_like(lora.weight.b))
    assert lora.weight.a.dtype == adapter_dtype and lora.weight.w.dtype == jnp.bfloat16
    x = jr.normal(getkey(), (8,)).astype(jnp.bfloat16)
    out = eqx.filter_jit(quax.quaxify(lora))(x)
    assert out.dtype == jnp.bfloat16
    expected = merge(lora)(x)
    assert np.allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=0.1
    )
    grads = eqx.filter_grad(lambda m: quax.quaxify(m)(x).astype(jnp.float32).sum())(
        lora
    )
    assert grads.weight.b.dtype == adapter_dtype and jnp.any(grads.weight.b)


def test_demo_main_pieces_run_small(tmp_path):
    # The `make demo` script at tiny sizes: pretrain, loraify, fine-tune, merge, plot.
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples/lora_finetune.py"
    spec = importlib.util.spec_from_file_location("lora_finetune", path)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = demo.main(
        vocab=8, seq=4, width=8, depth=1, heads=2, rank=2, batch=8,
        pretrain_steps=2, finetune_steps=3, out_dir=tmp_path, quiet=True,
    )  # fmt: skip
    assert out["plot"].exists()
    assert 0 < out["n_trainable"] < out["n_total"]
    assert out["unchanged"] and out["max_diff"] < 1e-4
    losses = out["pretrain_losses"] + out["finetune_losses"]
    assert len(losses) == 5 and np.all(np.isfinite(losses))


# -- values inside LoRA: the frozen weight is itself a value (issue 8.6) -----------------


def test_lora_on_a_ruleless_weight_matches_dense(mode, getkey):
    from builders import Ruleless

    kw, ka, kb = jr.split(getkey(), 3)
    lora = LoraArray(Ruleless(jr.normal(kw, (3, 4))), rank=2, key=ka, scale=1.0)
    lora = eqx.tree_at(lambda m: m.b, lora, jr.normal(kb, (2, 4)))
    x = jr.normal(getkey(), (5, 4))

    def every_case(w, x):
        out = {"w_at_x": w @ x[0], "x_at_w": x[:, :3] @ w, "x_at_wT": x @ w.T}
        for name, fn in KEEPS_TYPE.items():
            v = fn(w)
            v = v.T if name in ("transpose", "chain") else v
            out[name] = (x.astype(v.dtype) @ v.T).astype(jnp.float32)
        return out

    _check(every_case, lora, x, mode=mode, rtol=1e-2, atol=1e-2)


# -- every parameter of every primitive (issue 8.2) ----------------------------------------


def test_dot_general_precision_and_preferred_type(getkey):
    lora = _lora(getkey())
    lora16 = jtu.tree_map(
        lambda x: x.astype(jnp.bfloat16) if eqx.is_array(x) else x, lora
    )
    x = jr.normal(getkey(), (4, 5))
    hi = lax.Precision.HIGHEST

    def cases(w, x):
        x = x.astype(w.dtype)
        dn = (((1,), (0,)), ((), ()))
        return {
            "highest": lax.dot_general(w, x, dn, precision=hi).astype(jnp.float32),
            "pair": lax.dot_general(
                w, x, dn, precision=(hi, lax.Precision.DEFAULT)
            ).astype(jnp.float32),
            "preferred": lax.dot_general(w, x, dn, preferred_element_type=jnp.float32),
            "rhs_preferred": lax.dot_general(
                x.T, w.T, dn, preferred_element_type=jnp.float32
            ),
        }

    got = quax.quaxify(cases)(lora16, x)
    expected = cases(merge(lora16), x)
    assert all(got[k].dtype == expected[k].dtype for k in got)
    assert tree_allclose(got, expected, rtol=3e-2, atol=3e-2)
    assert tree_allclose(quax.quaxify(cases)(lora, x), cases(merge(lora), x))


def test_dot_algorithm_is_declined(getkey):
    lora = _lora(getkey())
    fn = lambda w, x: lax.dot_general(
        w, x, (((1,), (0,)), ((), ())), precision=lax.DotAlgorithmPreset.F32_F32_F32
    )
    with pytest.raises(quax.NoHandlerError, match="dot_general"):
        quax.quaxify(fn)(lora, jnp.ones(4))


@pytest.mark.parametrize(
    "fn",
    [
        lambda w: w * jnp.inf,
        lambda w: -jnp.inf * w,
        lambda w: w / 0.0,
        lambda w: w / -0.0,
        lambda w: w * jnp.nan,
    ],
    ids=["mul_inf", "rmul_neg_inf", "div_zero", "div_neg_zero", "mul_nan"],
)
def test_scalar_edge_cases_match_dense(fn, getkey):
    # inf * (w + a b) is not inf * w + (inf * a) b where `a b` has zeros: declined.
    lora = _lora(getkey(), allow_materialise=True)
    lora = eqx.tree_at(lambda m: m.b, lora, lora.b.at[0].set(0.0))
    got = quax.quaxify(fn)(lora)
    assert tree_allclose(got, fn(merge(lora)))


def test_structure_rules_refuse_what_they_cannot_honour(getkey):
    lora = _lora(getkey())
    with pytest.raises(quax.NoHandlerError, match="mul"):
        quax.quaxify(lambda w: w * jnp.inf)(lora)
    with pytest.raises(quax.NoHandlerError, match="convert_element_type"):
        quax.quaxify(lambda w: w.astype(jnp.int32))(lora)


# -- slicing keeps the structure ------------------------------------------------------------

SLICES = {
    "rows": lambda w: w[1:3],
    "cols": lambda w: w[:, 1:],
    "strided": lambda w: w[::2, 1::2],
    "dynamic": lambda w: lax.dynamic_slice(w, (1, 2), (2, 2)),
    "squeeze_to_row": lambda w: w[1],
    "squeeze_to_col": lambda w: w[:, 2],
}


@pytest.mark.parametrize("name", sorted(SLICES))
def test_slices_keep_lora_or_give_the_row(name, getkey):
    lora = _lora(getkey())
    fn = SLICES[name]
    out = quax.quaxify(fn)(lora)
    assert isinstance(out, LoraArray) == (out.ndim == 2)
    assert tree_allclose(merge(out), fn(merge(lora)))


def test_batched_slices(getkey):
    lora = _lora(getkey(), shape=(3, 4, 5))
    for fn in (lambda w: w[1], lambda w: w[:, 1:3], lambda w: w[1:, :, 2]):
        out = quax.quaxify(fn)(lora)
        assert tree_allclose(merge(out), fn(merge(lora)))


# -- every layer kind, any model library (issue 12.5) ------------------------------------


def _every(layer):
    return True


def _nonzero_b(model, key):
    """Random `b`s, so that the update changes the result."""
    loras = [x for x in jtu.tree_leaves(model, is_leaf=_is_lora) if _is_lora(x)]
    keys = iter(jr.split(key, max(len(loras), 1)))
    return jtu.tree_map(
        lambda x: (
            eqx.tree_at(lambda m: m.b, x, 0.3 * jr.normal(next(keys), x.b.shape))
            if _is_lora(x)
            else x
        ),
        model,
        is_leaf=_is_lora,
    )


def _against_merged(model, call, *args, rtol=1e-4, atol=1e-4):
    """`call(model, *args)` through quaxify equals the merged dense model's, and the
    adapters' gradients equal those of the merged model (merge is differentiable)."""
    got = quax.quaxify(call)(model, *args)
    expected = call(merge(model), *args)
    assert tree_allclose(got, expected, rtol=rtol, atol=atol)
    params, static = eqx.partition(model, trainable(model))

    def loss(params, merged):
        m = eqx.combine(params, static)
        out = call(merge(m), *args) if merged else quax.quaxify(call)(m, *args)
        return jnp.sum(jnp.sin(out))

    g = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
    g_dense = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
    assert _leaves_allclose(g, g_dense, rtol=rtol, atol=atol)
    return got


def _leaves_allclose(a, b, rtol=1e-5, atol=1e-5):
    """Leaf by leaf (gradient trees hold `LoraArray`s whose frozen `w` is None)."""
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    assert len(la) == len(lb) > 0
    return all(
        np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(la, lb, strict=True)
    )


@pytest.mark.parametrize(
    "dims,kwargs",
    [
        (1, dict(stride=2, padding=1)),
        (2, dict(padding="SAME", dilation=2)),
        (3, dict(padding=0)),
    ],
    ids=["conv1d", "conv2d", "conv3d"],
)
def test_equinox_conv_any_dimension(dims, kwargs, getkey):
    conv = eqx.nn.Conv(dims, 3, 4, 3, key=getkey(), **kwargs)
    model = _nonzero_b(loraify(conv, rank=2, key=getkey(), where=_every), getkey())
    assert _is_lora(model.weight) and model.weight.row_ndim == 1  # (out | in, *k)
    x = jr.normal(getkey(), (3,) + (6,) * dims)
    _against_merged(model, lambda m, x: m(x), x)


def test_conv_traces_to_thin_products(getkey):
    conv = eqx.nn.Conv2d(8, 16, 3, key=getkey())
    model = loraify(conv, rank=2, key=getkey(), where=_every)
    closed = walked(
        jax.make_jaxpr(quax.quaxify(lambda m, x: m(x)))(model, jnp.ones((8, 7, 7)))
    )
    shapes = [
        v.aval.shape
        for e in _all_eqns(closed.jaxpr)
        if e.primitive is not lax.stop_gradient_p
        for v in e.outvars
    ]
    assert (16, 8, 3, 3) not in shapes  # the kernel's update is never formed
    convs = [e for e in _all_eqns(closed.jaxpr) if "conv" in e.primitive.name]
    assert len(convs) == 2  # conv(x, w) and conv(x, b')


def test_conv_input_feature_group_and_declines(getkey):
    # A kernel laid out (in, out, h, w) with the input features as its own group:
    # pointwise product first, then the conv with the other adapter.
    w = jr.normal(getkey(), (3, 4, 3, 3))
    lora = LoraArray(w, rank=2, key=getkey(), scale=1.0, row_ndim=1, batch_ndim=0)
    lora = eqx.tree_at(lambda m: m.b, lora, jr.normal(getkey(), (2, 4, 3, 3)))
    x = jr.normal(getkey(), (2, 3, 6, 6))

    def conv(k, x, groups=1):
        return lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NCHW", "IOHW", "NCHW"),
            feature_group_count=groups,
        )  # fmt: skip

    assert tree_allclose(quax.quaxify(conv)(lora, x), conv(merge(lora), x), atol=1e-4)
    # Grouped convolutions have no thin factorisation: declined (an error here).
    with pytest.raises(quax.NoHandlerError, match="conv_general_dilated"):
        quax.quaxify(lambda k, x: conv(k, x, 3))(
            LoraArray(jnp.ones((1, 3, 3, 3)), rank=1, key=getkey(), batch_ndim=0), x
        )


def test_equinox_embedding(getkey):
    emb = eqx.nn.Embedding(10, 4, key=getkey())
    assert not _is_lora(loraify(emb, rank=2, key=getkey()).weight)  # opt-in
    model = _nonzero_b(loraify(emb, rank=2, key=getkey(), where=_every), getkey())
    idx = jnp.array([0, 3, 9, 3])
    _against_merged(model, lambda m, i: jax.vmap(m)(i), idx)


@pytest.mark.parametrize(
    "mode,fill", [("fill", None), ("fill", 2.5), ("clip", None), (None, None)]
)
def test_gather_modes_match_dense(mode, fill, getkey):
    lora = _nonzero_b(_lora(getkey(), shape=(5, 3)), getkey())
    idx = jnp.array([[0, 4], [7, -1]])  # out of bounds in both directions
    fn = lambda w, i: jnp.take(w, i, axis=0, mode=mode, fill_value=fill)
    got = quax.quaxify(fn)(lora, idx)
    assert tree_allclose(got, fn(merge(lora), idx))


def test_flax_linen_params_dict_by_path(getkey):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(11, 8)(tokens)
            x = nn.Conv(8, (3,), padding="SAME")(x)  # kernel (3, in, out)
            x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
            return nn.Dense(3)(x)

    net = Net()
    tokens = jnp.array([1, 5, 10, 2])
    params = net.init(getkey(), tokens)
    model = loraify(params, rank=2, key=getkey(), where=["kernel", "embedding"])
    loras = [x for x in jtu.tree_leaves(model, is_leaf=_is_lora) if _is_lora(x)]
    assert len(loras) == 7  # embed, conv, query, key, value, out, dense
    model = _nonzero_b(model, getkey())
    _against_merged(model, lambda p, t: net.apply(p, t), tokens, atol=2e-4)


def test_flax_nnx_state_by_path(getkey):
    from flax import nnx

    mha = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(mha)
    model = loraify(state, rank=2, key=getkey(), where=r"(query|value)\.kernel")

    def leaf(x):
        return jtu.tree_leaves(x, is_leaf=_is_lora)[0]

    assert _is_lora(leaf(model["query"]["kernel"]))
    assert not _is_lora(leaf(model["key"]["kernel"]))
    model = _nonzero_b(model, getkey())
    x = jr.normal(getkey(), (5, 8))
    _against_merged(model, lambda s, x: nnx.merge(graphdef, s)(x), x)


def test_plain_dict_out_in_layout(getkey):
    params = {"enc": {"w": jr.normal(getkey(), (6, 4, 3))}, "bias": jnp.ones(6)}
    model = loraify(params, rank=2, key=getkey(), where=["enc.w"], layout="out_in")
    w = model["enc"]["w"]
    assert w.a.shape == (6, 2) and w.b.shape == (2, 4, 3)
    model = _nonzero_b(model, getkey())
    x = jr.normal(getkey(), (4, 3))
    _against_merged(
        model, lambda p, x: jnp.tensordot(p["enc"]["w"], x, 2) + p["bias"], x
    )
    with pytest.raises(ValueError, match="layout"):
        loraify(params, rank=2, key=getkey(), where=["enc.w"], layout=3)


def test_equinox_attention_and_adapters_saved_alone(tmp_path, getkey):
    attn = eqx.nn.MultiheadAttention(2, 8, key=getkey())
    model = _nonzero_b(loraify(attn, rank=2, key=getkey()), getkey())
    q = jr.normal(getkey(), (5, 8))
    _against_merged(model, lambda m, q: m(q, q, q), q)
    # Save only the adapters; load them into a freshly adapted model.
    params, _ = eqx.partition(model, trainable(model))
    path = tmp_path / "adapters.eqx"
    eqx.tree_serialise_leaves(path, params)
    fresh = loraify(attn, rank=2, key=getkey())
    fresh_params, static = eqx.partition(fresh, trainable(fresh))
    loaded = eqx.combine(eqx.tree_deserialise_leaves(path, fresh_params), static)
    assert tree_allclose(quax.quaxify(loaded)(q, q, q), quax.quaxify(model)(q, q, q))
    n_saved = sum(x.size for x in jtu.tree_leaves(params))
    n_total = sum(x.size for x in jtu.tree_leaves(eqx.filter(model, eqx.is_array)))
    assert n_saved < n_total / 2


def test_loraify_stacked_layers_scans_without_materialising():
    # `eqx.filter_vmap` of a layer's constructor stacks its weight: each layer of the
    # stack gets its own adapters, so `lax.scan` over the stack slices them layer by
    # layer (a default LoraArray refuses to materialise).
    stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(6, 6, key=k))(
        jr.split(jr.key(0), 3)
    )
    lora = quax.lora.loraify(stack, rank=2, key=jr.key(1))
    assert lora.weight.a.shape == (3, 6, 2) and lora.weight.b.shape == (3, 2, 6)

    def forward(stack, x):
        params, static = eqx.partition(stack, eqx.is_array)
        step = lambda x, p: (jnp.tanh(eqx.combine(p, static)(x)), None)
        return jax.lax.scan(step, x, params)[0]

    x = jnp.linspace(-1.0, 1.0, 6)
    got = quax.quaxify(forward)(lora, x)
    assert tree_allclose(got, forward(quax.lora.merge(lora), x), rtol=1e-5, atol=1e-5)
