"""Dense equivalence: `jax.numpy`, `jax.nn` and `jax.lax` functions on every builder's
value give what they give on the value's `materialise()`d array (issue 2, point 4).

Each case is `fn(v, s, *extra)`: `v` is the builder's value (any shape of rank >= 2 and
a floating dtype; the functions read its shape), `s` a plain float scalar that the
`grad` mode differentiates with respect to, and `extra` plain arrays made to fit `v`.
Most cases feed `v * s` to the function under test, so the gradient flows through it.

Modes, to keep this file fast (`pytest -n 2` well under 3 minutes):

- every case runs on every builder `eager` and `jit_outside`;
- `jit_inside`, `grad` (w.r.t. `s`) and `vmap` run on every builder for the cases
  in `TRANSFORMED`, a representative subset (one or more per family);
- the gradient w.r.t. the value's own leaves (through quax vs. through
  `materialise()`) runs eagerly on the cases in `LEAF_GRAD`.

Functions of one family are checked together as one program (a `Case`, whose
output is a dict keyed by function), so each builder costs one trace and one compile
per family, not per function.
"""

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest
from builders import BUILDERS
from helpers import assert_matches_dense, densify, run_mode, tree_allclose

import quax


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """A family of functions `{name: fn(v, s, *extra)}` run as one program (one trace,
    one compile), so a builder is checked on many functions cheaply."""

    name: str
    fns: dict[str, Callable[..., Any]]
    # Plain extra arguments, made from the value's shape and a key.
    extra: Callable[[tuple[int, ...], Any], tuple]
    rtol: float
    atol: float
    # {builder kind or (kind, mode): reason}, marked xfail(strict=True).
    xfail: dict[Any, str]

    def fn(self, v, s, *extra):
        return {name: f(v, s, *extra) for name, f in self.fns.items()}


CASES: dict[str, Case] = {}
TRANSFORMED: list[str] = []  # grad and vmap modes run on these
LEAF_GRAD: list[str] = []  # the gradient w.r.t. the value's leaves runs on these


def case(
    name,
    fns,
    extra=lambda shape, key: (),
    *,
    transformed=False,
    leaf_grad=False,
    rtol=1e-5,
    atol=1e-5,
    xfail=None,
):
    if not isinstance(fns, dict):
        fns = {name: fns}
    if name in CASES:
        raise ValueError(name)
    CASES[name] = Case(name, fns, extra, rtol, atol, xfail or {})
    if transformed:
        TRANSFORMED.append(name)
    if leaf_grad:
        LEAF_GRAD.append(name)


def like(shape, key):
    """One plain array of the value's shape."""
    return (jr.normal(key, shape),)


def row(shape, key):
    """One plain array of the value's last dimension."""
    return (jr.normal(key, shape[-1:]),)


def right(shape, key):
    """A plain matrix to multiply the value with on the right."""
    return (jr.normal(key, (shape[-1], 2)),)


def left(shape, key):
    """A plain matrix to multiply the value with on the left."""
    return (jr.normal(key, (2, shape[-2])),)


def spd(v):
    """A symmetric positive definite matrix made from `v`."""
    m = v.shape[-2]
    return v @ jnp.swapaxes(v, -1, -2) + m * jnp.eye(m, dtype=v.dtype)


def first(v):
    """The leading `(m, n)` block, whatever the value's rank."""
    while v.ndim > 2:
        v = v[0]
    return v


def of_scaled(ops):
    """`{name: op}` as `{name: fn(v, s) = op(v * s)}`."""
    return {name: (lambda v, s, op=op: op(v * s)) for name, op in ops.items()}


# -- elementwise, unary ------------------------------------------------------------------

case(
    "unary_smooth",
    of_scaled(
        {
            "sin": jnp.sin,
            "cos": jnp.cos,
            "tanh": jnp.tanh,
            "exp": jnp.exp,
            "expm1": jnp.expm1,
            "sinh": jnp.sinh,
            "arctan": jnp.arctan,
        }
    ),
    transformed=True,
    leaf_grad=True,
)
case(
    "unary_domain",
    of_scaled(
        {
            "log": lambda x: jnp.log(jnp.abs(x) + 1.0),
            "log1p": lambda x: jnp.log1p(jnp.abs(x)),
            "sqrt": lambda x: jnp.sqrt(jnp.abs(x) + 0.5),
            "rsqrt": lambda x: lax.rsqrt(x * x + 0.5),
            "reciprocal": lambda x: jnp.reciprocal(x * x + 1.0),
            "power": lambda x: (jnp.abs(x) + 0.5) ** 2.5,
            "erf": lax.erf,
        }
    ),
    transformed=True,
    rtol=1e-4,
)
case(
    "unary_piecewise",
    of_scaled(
        {
            "abs": jnp.abs,
            "negative": jnp.negative,
            "square": jnp.square,
            "sign": jnp.sign,
            "floor": jnp.floor,
            "round": jnp.round,
        }
    ),
)
case(
    "clip",
    of_scaled(
        {
            "clip": lambda x: jnp.clip(x, -0.5, 0.5),
            "lax_clamp": lambda x: lax.clamp(-0.5, x, 0.5),
            "isfinite": jnp.isfinite,
            "nan_to_num": lambda x: jnp.nan_to_num(jnp.log(x)),
        }
    ),
)

# -- elementwise, binary (value on either side) ---------------------------------------------


def both_sides(ops):
    out = {}
    for name, op in ops.items():
        out[f"{name}(value, plain)"] = lambda v, s, x, op=op: op(v * s, x)
        out[f"{name}(plain, value)"] = lambda v, s, x, op=op: op(x * s, v)
    return out


case(
    "binary_arithmetic",
    both_sides(
        {
            "add": jnp.add,
            "subtract": jnp.subtract,
            "multiply": jnp.multiply,
            "divide": lambda a, b: a / (b * b + 1.0),
        }
    ),
    like,
    transformed=True,
)
case(
    "binary_other",
    both_sides(
        {
            "maximum": jnp.maximum,
            "minimum": jnp.minimum,
            "arctan2": jnp.arctan2,
            "mod": lambda a, b: jnp.mod(a, jnp.abs(b) + 0.5),
            "where": lambda a, b: jnp.where(a > b, a, b),
        }
    ),
    like,
)
case(
    "binary_value_value",
    {
        "add": lambda v, s, r: v * s + v,
        "multiply": lambda v, s, r: v * (v * s),
        "add_broadcast_row": lambda v, s, r: v + s * r[None, :],
        "python_scalars": lambda v, s, r: (v + 2.0) * s - 1,
    },
    row,
    transformed=True,
    leaf_grad=True,
)

# -- comparisons, logical and integer ops ---------------------------------------------------

case(
    "comparisons",
    lambda v, s, x: (v > x, v <= s, jnp.equal(v, v), jnp.not_equal(v, x), v * s),
    like,
)
case(
    "logical_bool",
    lambda v, s: (
        jnp.logical_and(v > 0, v < s),
        jnp.logical_or(v > s, v < -s),
        jnp.logical_not(v > 0),
        jnp.logical_xor(v > 0, v > s),
        jnp.where(jnp.logical_and(v > 0, v < s), v * s, 0.0),
        jnp.any(v > s),
        jnp.all(v > -10.0, axis=-1),
        jnp.count_nonzero(v > 0, axis=-1),
    ),
    transformed=True,
)
case(
    "integer_ops",
    lambda v, s: (
        lambda i: (i & 5, i | 2, i ^ 3, i // 2, i % 3, i << 1, i >> 1, -i, jnp.abs(i))
    )((v * 4).astype(jnp.int32)),
    transformed=True,
)

# -- dtype conversion ---------------------------------------------------------------------

case(
    "astype_bf16",
    lambda v, s: (v * s).astype(jnp.bfloat16),
    rtol=1e-2,
    atol=1e-2,
)
case(
    "astype_roundtrip",
    {
        "bf16": lambda v, s: (v * s).astype(jnp.bfloat16).astype(v.dtype),
        "float16": lambda v, s: (v * s).astype(jnp.float16).astype(v.dtype),
        "lax_convert": lambda v, s: lax.convert_element_type(v * s, jnp.float16),
    },
    # Rounding is not distributive: a structured type (LoRA) may round its parts
    # separately, so the round trip matches to the precision of the narrow dtype.
    rtol=1e-2,
    atol=1e-2,
)
case(
    "astype_int_bool",
    lambda v, s: (
        v.astype(jnp.int32),
        v.astype(bool),
        lax.bitcast_convert_type(v, jnp.int32),
    ),
)
case("complex", lambda v, s, x: jnp.abs((v + 1j * x) * s), like)

# -- reductions ---------------------------------------------------------------------------

case(
    "reductions",
    of_scaled(
        {
            "sum": jnp.sum,
            "sum_axis0": lambda x: jnp.sum(x, axis=0),
            "mean_axis": lambda x: jnp.mean(x, axis=-1),
            "max": jnp.max,
            "min_axis": lambda x: jnp.min(x, axis=0),
            "prod_axis": lambda x: jnp.prod(x, axis=-1),
        }
    ),
    transformed=True,
    leaf_grad=True,
)
case(
    "statistics",
    of_scaled(
        {
            "var": jnp.var,
            "std_axis": lambda x: jnp.std(x, axis=-1),
            "argmax": lambda x: jnp.argmax(x, axis=-1),
            "argmin": jnp.argmin,
            "logsumexp": lambda x: jax.nn.logsumexp(x, axis=-1),
        }
    ),
    rtol=1e-4,
)
case(
    "norms",
    of_scaled(
        {
            "norm_fro": jnp.linalg.norm,
            "norm_axis": lambda x: jnp.linalg.norm(x, axis=-1),
            "trace": lambda x: jnp.trace(x, axis1=-2, axis2=-1),
        }
    ),
)
case(
    "cumulative",
    of_scaled(
        {
            "cumsum": lambda x: jnp.cumsum(x, axis=-1),
            "cumprod": lambda x: jnp.cumprod(x, axis=0),
            "lax_cumsum": lambda x: lax.cumsum(x, axis=0, reverse=True),
            "lax_cummax": lambda x: lax.cummax(x, axis=x.ndim - 1),
            "lax_reduce": lambda x: lax.reduce(x, 0.0, lax.add, (0,)),
        }
    ),
)

# -- linear algebra ------------------------------------------------------------------------

case(
    "matmul_value_plain",
    lambda v, s, w: (v * s) @ w,
    right,
    transformed=True,
    leaf_grad=True,
)
case("matmul_plain_value", lambda v, s, w: (w * s) @ v, left)
case("matmul_value_value", lambda v, s: v @ jnp.swapaxes(v * s, -1, -2), leaf_grad=True)
case(
    "products",
    {
        "dot": lambda v, s, w, x: jnp.dot(first(v) * s, w),
        "tensordot": lambda v, s, w, x: jnp.tensordot(v * s, w, axes=1),
        "outer": lambda v, s, w, x: jnp.outer(first(v)[0] * s, first(v)[-1]),
        "inner": lambda v, s, w, x: jnp.inner(v * s, x),
        "lax_dot_general": lambda v, s, w, x: lax.dot_general(
            v * s, x, (((v.ndim - 1,), (x.ndim - 1,)), ((), ()))
        ),
    },
    lambda shape, key: (*right(shape, key), *like(shape, key)),
    rtol=1e-4,
)
case(
    "einsum",
    {
        "pairwise": lambda v, s, x: jnp.einsum("...ij,...kj->...ik", v * s, v),
        "reduce": lambda v, s, x: jnp.einsum("...ij,...ij->...j", v * s, x),
    },
    like,
    transformed=True,
    leaf_grad=True,
)
case(
    "linalg",
    {
        "solve": lambda v, s, x: jnp.linalg.solve(spd(v * s), x),
        "inv": lambda v, s, x: jnp.linalg.inv(spd(v * s)),
        "det": lambda v, s, x: jnp.linalg.det(spd(v * s)),
        "cholesky": lambda v, s, x: jnp.linalg.cholesky(spd(v * s)),
    },
    like,
    transformed=True,
    leaf_grad=True,
    rtol=1e-4,
    atol=1e-4,
)

# -- shape ops and indexing -----------------------------------------------------------------

case(
    "reshape",
    of_scaled(
        {
            "reshape_flat": lambda x: jnp.reshape(x, (-1,)),
            "reshape_swap": lambda x: x.reshape(x.shape[::-1]),
            "transpose": jnp.transpose,
            "dot_T": lambda x: x.T,
            "swapaxes": lambda x: jnp.swapaxes(x, 0, -1),
            "moveaxis": lambda x: jnp.moveaxis(x, 0, -1),
            "expand_squeeze": lambda x: jnp.squeeze(jnp.expand_dims(x, 0), 0),
            "broadcast_to": lambda x: jnp.broadcast_to(x, (2, *x.shape)),
            "ravel": jnp.ravel,
        }
    ),
    transformed=True,
    leaf_grad=True,
)
case(
    "join_split",
    {
        "concatenate": lambda v, s, x: jnp.concatenate([v * s, x, v], axis=-1),
        "stack": lambda v, s, x: jnp.stack([v * s, x]),
        "split": lambda v, s, x: jnp.split(v * s, [1], axis=0),
        "tile": lambda v, s, x: jnp.tile(v * s, 2),
        "repeat": lambda v, s, x: jnp.repeat(v, 2, axis=0),
    },
    like,
)
case(
    "pad_flip",
    of_scaled(
        {
            "pad": lambda x: jnp.pad(x, 1),
            "pad_edge": lambda x: jnp.pad(x, ((1, 0),) * x.ndim, mode="edge"),
            "lax_pad": lambda x: lax.pad(x, 0.0, [(1, 0, 1), (0, 2, 0)]),
            "flip": lambda x: jnp.flip(x, axis=0),
            "roll": lambda x: jnp.roll(x, 1, axis=-1),
            "lax_rev": lambda x: lax.rev(x, (0,)),
            "triu": jnp.triu,
            "tril": jnp.tril,
            "diagonal": lambda x: jnp.diagonal(x, axis1=-2, axis2=-1),
        }
    ),
)
case(
    "index_static",
    of_scaled(
        {
            "int": lambda x: x[0],
            "int_pair": lambda x: x[-1, 1],
            "slice": lambda x: x[1:3],
            "strided": lambda x: x[::2, ::-1],
            "newaxis_ellipsis": lambda x: x[None, ..., None],
        }
    ),
)
case(
    "index_arrays",
    of_scaled(
        {
            "take": lambda x: jnp.take(x, jnp.array([0, 2, 1, 0]) % x.shape[-1], -1),
            "int_array": lambda x: x[jnp.array([1, 0, 1]) % x.shape[0]],
            "mixed": lambda x: x[:, jnp.array([0, 1]), ...][..., 0:1],
            "traced_int": lambda x: x[jnp.argmax(x[:, 0], axis=0)],
            "take_along_axis": lambda x: jnp.take_along_axis(
                x, jnp.argsort(x, axis=-1), axis=-1
            ),
        }
    ),
    transformed=True,
    leaf_grad=True,
)
case(
    "sorting",
    of_scaled(
        {
            "sort": lambda x: jnp.sort(x, axis=-1),
            "argsort": lambda x: jnp.argsort(x, axis=0),
            "top_k": lambda x: lax.top_k(x, 2),
        }
    ),
    transformed=True,
    leaf_grad=True,
)
case(
    "at_updates",
    {
        "add": lambda v, s, x: (v * s).at[0].add(1.0).at[jnp.array([1, 0])].add(s),
        "add_value_update": lambda v, s, x: (x * s).at[1:].add(v[:-1]),
        "set": lambda v, s, x: (v * s).at[:, 0].set(s),
        "max": lambda v, s, x: (v * s).at[0, 1].max(0.0),
        "get": lambda v, s, x: (v * s).at[jnp.array([0, 0])].get(),
    },
    like,
    transformed=True,
)

# -- jax.nn -------------------------------------------------------------------------------

case(
    "nn_normalising",
    of_scaled(
        {
            "softmax": lambda x: jax.nn.softmax(x, axis=-1),
            "log_softmax": lambda x: jax.nn.log_softmax(x, axis=0),
            "logsumexp": jax.nn.logsumexp,
            "standardize": lambda x: jax.nn.standardize(x, axis=-1),
        }
    ),
    leaf_grad=True,
    rtol=1e-4,
    atol=1e-4,
)
case(
    "nn_activations",
    of_scaled(
        {
            "relu": jax.nn.relu,
            "gelu": jax.nn.gelu,
            "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
            "softplus": jax.nn.softplus,
            "silu": jax.nn.silu,
            "sigmoid": jax.nn.sigmoid,
            "elu": jax.nn.elu,
            "leaky_relu": jax.nn.leaky_relu,
        }
    ),
    transformed=True,
)
case(
    "one_hot",
    lambda v, s: jax.nn.one_hot(jnp.argmax(v, axis=-1), v.shape[-1]) * s,
)

# -- jax.lax --------------------------------------------------------------------------------


def _conv(lhs, rhs):
    return lax.conv_general_dilated(lhs, rhs, (1, 1), "SAME", rhs_dilation=(1, 1))


case(
    "conv",
    {
        "value_input": lambda v, s, x, k: _conv(first(v * s)[None, None], k),
        "value_kernel": lambda v, s, x, k: _conv(
            first(x)[None, None], first(v * s)[None, None]
        ),
    },
    lambda shape, key: (*like(shape, key), jr.normal(key, (2, 1, 2, 2))),
    transformed=True,
    leaf_grad=True,
    rtol=1e-4,
    atol=1e-4,
)
case(
    "reduce_window",
    of_scaled(
        {
            "max": lambda x: lax.reduce_window(
                x, -jnp.inf, lax.max, (2, 2), (1, 1), "VALID"
            ),
            "add": lambda x: lax.reduce_window(x, 0.0, lax.add, (2, 1), (1, 1), "SAME"),
        }
    ),
)
case(
    "dynamic_slicing",
    {
        "dynamic_slice": lambda v, s, x: lax.dynamic_slice(v * s, (1, 0), (2, 2)),
        "traced_index": lambda v, s, x: lax.dynamic_slice(
            v * s, (jnp.argmax(v[:, 0]), 1), (1, 2)
        ),
        "update_value": lambda v, s, x: lax.dynamic_update_slice(
            v * s, x[:1, :2], (1, 1)
        ),
        "update_with_value": lambda v, s, x: lax.dynamic_update_slice(
            x * s, v[:1, :2], (0, 1)
        ),
    },
    like,
    transformed=True,
    leaf_grad=True,
)
case(
    "lax_misc",
    {
        "select": lambda v, s, x: lax.select(v > x, v * s, x),
        "stop_gradient": lambda v, s, x: lax.stop_gradient(v) * s + v * s,
        "sign_abs": lambda v, s, x: lax.sign(v) * lax.abs(x) * s,
    },
    like,
)
case(
    "control_flow",
    {
        "fori_loop": lambda v, s: lax.fori_loop(
            0, 3, lambda i, c: c * s + v, jnp.zeros_like(v)
        ),
        "cond": lambda v, s: lax.cond(s > 0, lambda a: a * s, lambda a: -a, v),
        "scan": lambda v, s: lax.scan(
            lambda c, r: (c + r * s, c), jnp.zeros_like(v[0]), v
        ),
    },
    transformed=True,
)
case(
    "scan_carry_ys",
    # The value as the carry, and stacked as the ys.
    lambda v, s: lax.scan(lambda c, _: (c * s, c), v, length=2),
    transformed=True,
)
case(
    # Not in TRANSFORMED: reverse mode cannot cross a while loop (dense neither).
    "while_loop",
    {
        "while": lambda v, s: lax.while_loop(
            lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] * s), (0, v)
        )[1],
        "traced_bound": lambda v, s: lax.fori_loop(
            0, (s > 0).astype(jnp.int32) + 1, lambda i, c: c * s + v, v
        ),
    },
)


#: Every function checked, for the count in the module docstring (>= 70).
FUNCTIONS = [f"{c.name}.{f}" for c in CASES.values() for f in c.fns]
assert len(FUNCTIONS) >= 70, len(FUNCTIONS)


#: The builders `make test` runs through this file; every other builder runs it under
#: `make test-all` (marked slow), and is checked against dense in its own test file.
CORE_KINDS = frozenset({"lora", "nested", "ruleless", "scaled", "zero"})


def _params(names, modes=(None,), *, core_only=False):
    """Every (case, builder, mode). With `core_only`, `make test` runs each case on
    two of the core builders, each in one of `modes`, rotating with the case, so every
    core builder and every mode meet many cases; the rest is marked slow (`make
    test-all` runs all of it)."""
    out = []
    core = sorted(CORE_KINDS)
    for i, name in enumerate(names):
        c = CASES[name]
        fast = {core[(i + n) % len(core)]: modes[(i + n) % len(modes)] for n in (0, 2)}
        for kind in sorted(BUILDERS):
            for mode in modes:
                reason = c.xfail.get(kind) or c.xfail.get((kind, mode))
                marks = (
                    [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                )
                if core_only and fast.get(kind, ...) != mode:
                    marks.append(pytest.mark.slow)
                args, ids = (c, kind), [name, kind]
                if mode is not None:
                    args, ids = (*args, mode), [*ids, mode]
                out.append(pytest.param(*args, marks=marks, id="-".join(ids)))
    return out


def _build(c: Case, kind: str):
    kv, kx = jr.split(jr.key(zlib.crc32(c.name.encode())))
    value, dense = BUILDERS[kind](kv)
    s = jnp.asarray(1.3, dense.dtype)
    return value, dense, (s, *c.extra(tuple(value.shape), kx))


def test_builders_materialise_to_their_dense_array():
    for kind in sorted(BUILDERS):
        value, dense = BUILDERS[kind](jr.key(0))
        assert tree_allclose(value.materialise(), dense), kind
        assert value.shape == dense.shape and value.dtype == dense.dtype


@pytest.mark.parametrize(
    ("c", "kind", "mode"),
    _params(CASES, ("eager", "jit_outside"), core_only=True),
    indirect=["mode"],
)
def test_matches_dense(c: Case, kind: str, mode: str):
    value, _, args = _build(c, kind)
    assert_matches_dense(c.fn, value, *args, mode=mode, rtol=c.rtol, atol=c.atol)


@pytest.mark.parametrize(
    ("c", "kind", "mode"),
    _params(TRANSFORMED, ("jit_inside", "grad", "vmap"), core_only=True),
    indirect=["mode"],
)
def test_matches_dense_transformed(c: Case, kind: str, mode: str):
    value, _, args = _build(c, kind)
    if mode == "vmap" and not jtu.tree_leaves(eqx.filter(value, eqx.is_array)):
        # A value without array leaves (a symbolic zero) cannot be batched: vmap
        # passes it through unmapped, so its results come back unbatched where the
        # dense run (over two identical stacked copies) batches them. Broadcast.
        got = densify(run_mode(c.fn, (value, *args), "vmap", quaxed=True))
        expected = run_mode(c.fn, densify((value, *args)), "vmap", quaxed=False)
        got = jtu.tree_map(lambda g, e: jnp.broadcast_to(g, e.shape), got, expected)
        assert tree_allclose(got, expected, rtol=c.rtol, atol=c.atol), (got, expected)
    else:
        assert_matches_dense(c.fn, value, *args, mode=mode, rtol=c.rtol, atol=c.atol)


def _loss(out):
    leaves = jtu.tree_leaves(densify(out))
    return sum(
        (jnp.sum(jnp.real(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)),
        jnp.zeros(()),
    )


@pytest.mark.parametrize(("c", "kind"), _params(LEAF_GRAD, core_only=True))
def test_grad_wrt_value_leaves(c: Case, kind: str):
    value, _, args = _build(c, kind)

    def through_quax(v):
        return _loss(quax.quaxify(c.fn)(v, *args))

    def through_dense(v):
        return _loss(c.fn(v.materialise(), *args))

    # Under jit: one compile per program instead of op-by-op eager gradients.
    got = eqx.filter_jit(eqx.filter_grad(through_quax))(value)
    expected = eqx.filter_jit(eqx.filter_grad(through_dense))(value)
    got_leaves, expected_leaves = jtu.tree_leaves(got), jtu.tree_leaves(expected)
    assert len(expected_leaves) == len(
        jtu.tree_leaves(eqx.filter(value, eqx.is_inexact_array))
    )
    assert tree_allclose(got_leaves, expected_leaves, rtol=c.rtol, atol=c.atol)
