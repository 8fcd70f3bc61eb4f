"""Running a program through quax and on dense arrays, in one of the `MODES`, and
judging the two outcomes.

The dense side is the truth: the same program on the value's dense array, compiled
as one fresh `jax.jit` closure per program (one compile instead of one per operation;
a fresh closure, so no cache can merge `0.0` and `-0.0`).
"""

import functools as ft
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from builders import numbers

import quax
from quax._errors import QuaxBugError

from .exclusions import MORE_DEFINED
from .program import Program, make_extras, run_program, skeleton, twin as twin_program


MODES = (
    "eager",  # quaxify(f)(v, ...), then again with every signed zero flipped
    "jit_outside",  # jax.jit(quaxify(f))
    "jit_inside",  # quaxify(jax.jit(f))
    "grad_outside",  # jax.grad(quaxify(f)) w.r.t. the value's leaves, s, extras
    "grad_inside",  # quaxify(jax.grad(f)) w.r.t. the value itself and s
    "vmap_outside",  # jax.vmap(quaxify(f)) over a batch of values, s and extras
    "vmap_inside",  # quaxify(jax.vmap(f)) over s and extras, the value unbatched
)


class FuzzFailure(AssertionError):
    """quax and the dense program disagree."""


class ValueMismatch(FuzzFailure):
    """Same shapes and dtypes, different numbers, first at output leaf `index`."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def is_value(x: Any) -> bool:
    return isinstance(x, quax.Value)


def densify(tree: Any) -> Any:
    return jtu.tree_map(
        lambda x: numbers(x) if is_value(x) else x, tree, is_leaf=is_value
    )


def total(outs: Any) -> jax.Array:
    """A scalar loss of a program's outputs: the sum of every inexact output."""
    parts = [
        jnp.sum(o.astype(jnp.float32))
        for o in jtu.tree_leaves(outs)
        if jnp.issubdtype(o.dtype, jnp.inexact)
    ]
    return sum(parts, jnp.zeros((), jnp.float32))


# Module-level quaxified functions, so that their trace caches are shared by every
# example (as a user's `quaxify(f)` is called again and again).


def _grad_program(skel, literals, v, s, extras, wrt_v):
    argnums = (0, 1) if wrt_v else (1,)
    loss = lambda v, s: total(run_program(skel, literals, v, s, extras))
    return jax.grad(loss, argnums)(v, s)


def _vmap_program(skel, literals, v, s, extras):
    return jax.vmap(lambda s, extras: run_program(skel, literals, v, s, extras))(
        s, extras
    )


Q_RUN = quax.quaxify(run_program)
Q_GRAD = quax.quaxify(_grad_program)
Q_VMAP = quax.quaxify(_vmap_program)


# -- outcomes --------------------------------------------------------------------------


def _outcome(thunk: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, jax.block_until_ready(thunk())
    except Exception as err:  # noqa: BLE001 -- judged by `judge`
        return False, err


def _is_refusal(err: BaseException, refuses: bool) -> bool:
    """quax's own deliberate error, for a type that will not materialise."""
    if isinstance(err, QuaxBugError | quax.HandlerResultError):
        return False
    return refuses and isinstance(err, quax.QuaxError) and bool(str(err))


def fresh_jit(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A thunk computing `fn(*args)` under a fresh `jax.jit` (a new closure: nothing
    cached from an earlier program is reused)."""
    return lambda: jax.jit(lambda *a: fn(*a))(*args)


def judge(
    what: str,
    got: tuple[bool, Any],
    expected: tuple[bool, Any],
    refuses: bool,
    more_defined: str | None = None,
) -> None:
    got_ok, got_val = got
    exp_ok, exp_val = expected
    if not got_ok:
        if _is_refusal(got_val, refuses):
            return
        if not exp_ok and not isinstance(
            got_val, QuaxBugError | quax.HandlerResultError
        ):
            # The dense program raises too: JAX does not run this program, so quax
            # cannot give a wrong number for it, and its error need not be the same
            # one (JAX's own message differs between, say, a symbolic and a dense
            # zero tangent of a primitive without a derivative rule). Only quax's
            # internal errors and a handler's bad result fail here.
            return
        detail = f"dense: {'ok' if exp_ok else _describe(exp_val)}"
        raise FuzzFailure(
            f"{what}: quax raised {_describe(got_val)}\n  ({detail})"
        ) from got_val
    if not exp_ok:
        if more_defined is not None and more_defined in str(exp_val):
            return  # the type's algebra removes what JAX refuses (MORE_DEFINED)
        raise FuzzFailure(
            f"{what}: quax returned a result but the dense program raised {_describe(exp_val)}"
        )
    compare(what, got_val, exp_val)


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {' / '.join(text[:6])}"


# -- comparison ------------------------------------------------------------------------

_RTOL = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 2e-4, "float64": 1e-9}


def compare(what: str, got: Any, expected: Any) -> None:
    """Same structure, shapes, dtypes and weak types exactly; values within a tolerance
    for the dtype, with NaNs at the same places and infinities of the same sign."""
    got_leaves, got_def = jtu.tree_flatten(got, is_leaf=is_value)
    exp_leaves, exp_def = jtu.tree_flatten(expected, is_leaf=is_value)
    if len(got_leaves) != len(exp_leaves):
        raise FuzzFailure(
            f"{what}: {len(got_leaves)} outputs, dense gives {len(exp_leaves)}\n  quax: {got_def}\n  dense: {exp_def}"
        )
    for i, (g, e) in enumerate(zip(got_leaves, exp_leaves, strict=True)):
        _compare_leaf(f"{what}, output {i}", g, e, i)


def _compare_leaf(what: str, g: Any, e: Any, index: int) -> None:
    if is_value(e):
        e = numbers(e)
    if is_value(g):
        aval = g.aval()
        g_type = (tuple(aval.shape), aval.dtype, bool(aval.weak_type))
        try:
            g = numbers(g)
        except Exception:  # noqa: BLE001 -- a type that will not materialise: avals only
            g = None
    else:
        g = jnp.asarray(g)
        g_type = (tuple(g.shape), g.dtype, bool(getattr(g, "weak_type", False)))
    e = jnp.asarray(e)
    e_type = (tuple(e.shape), e.dtype, bool(getattr(e, "weak_type", False)))
    if g_type[:2] != e_type[:2]:
        raise FuzzFailure(
            f"{what}: quax gives shape/dtype {_fmt(g_type)}, dense {_fmt(e_type)}"
        )
    if g_type[2] != e_type[2]:
        raise FuzzFailure(
            f"{what}: quax gives weak_type={g_type[2]}, dense weak_type={e_type[2]} ({_fmt(e_type)})"
        )
    if g is None:
        return
    if g.dtype == jax.dtypes.float0:
        return
    if jnp.issubdtype(e.dtype, jax.dtypes.prng_key):  # keys: compare their bits
        g, e = jax.random.key_data(g), jax.random.key_data(e)
    gn, en = np.asarray(g), np.asarray(e)
    if not jnp.issubdtype(e.dtype, jnp.inexact):
        if not np.array_equal(gn, en):
            raise ValueMismatch(
                f"{what}: values differ\n  quax:  {_short(gn)}\n  dense: {_short(en)}",
                index,
            )
        return
    if jnp.issubdtype(e.dtype, jnp.complexfloating):
        pairs = [(np.real(gn), np.real(en)), (np.imag(gn), np.imag(en))]
    else:
        pairs = [(gn, en)]
    rtol = _RTOL.get(str(e.dtype), 2e-4)
    for gp, ep in pairs:
        gp, ep = gp.astype(np.float64), ep.astype(np.float64)
        bad = np.isnan(gp) != np.isnan(ep)
        bad |= np.isposinf(gp) != np.isposinf(ep)
        bad |= np.isneginf(gp) != np.isneginf(ep)
        finite = np.isfinite(gp) & np.isfinite(ep)
        gp, ep = np.where(finite, gp, 0.0), np.where(finite, ep, 0.0)
        scale = np.max(np.abs(ep), initial=1.0)
        bad |= np.abs(gp - ep) > rtol * (np.abs(ep) + scale * 0.05 + 1e-6)
        if bad.any():
            raise ValueMismatch(
                f"{what}: values differ at {np.argwhere(bad)[:4].tolist()}\n  quax:  {_short(gn)}\n  dense: {_short(en)}",
                index,
            )


def _fmt(t: tuple) -> str:
    shape, dtype, weak = t
    return f"{dtype}{list(shape)}{' (weak)' if weak else ''}"


def _short(a: np.ndarray) -> str:
    return np.array2string(np.asarray(a), threshold=24, precision=5).replace("\n", " ")


# -- modes -----------------------------------------------------------------------------


def materialise_refuses(v: Any) -> bool:
    try:
        v.materialise()
    except Exception:  # noqa: BLE001 -- any refusal counts
        return True
    return False


def _inexact(x: Any) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def _stack(a: Any, b: Any) -> Any:
    return jtu.tree_map(lambda p, q: jnp.stack([p, q]) if eqx.is_array(p) else p, a, b)


def check(
    mode: str,
    program: Program,
    variants: list[tuple[Any, Any]],
    twin: bool = True,
    nonfinite_deviates: bool = False,
) -> None:
    """Run `program` in `mode` through quax and densely; raise `FuzzFailure` unless
    they agree (or quax refuses on purpose).

    With `nonfinite_deviates` (a type whose implicit zeros are exact zeros, or that
    reassociates products: see `fuzz.exclusions.NONFINITE_DEVIATES`), different
    numbers are excused when an infinity or NaN reached the program before the
    operation that differs: an input, a literal of the program, or an earlier
    intermediate of the dense run.
    A NaN or infinity the differing operation itself makes (a gather's fill value)
    is never excused."""
    try:
        _check(mode, program, variants, twin)
    except ValueMismatch as err:
        if not (nonfinite_deviates and _nonfinite_before(mode, program, variants, err)):
            raise


def _nonfinite_before(
    mode: str, program: Program, variants: list[tuple[Any, Any]], err: ValueMismatch
) -> bool:
    """Whether the dense program met an infinity or NaN before output leaf
    `err.index` (in the grad modes, whose outputs are gradients: anywhere in its
    forward run)."""
    inputs = [(program.s, make_extras(program.extras, program.seed))]
    denses = [variants[program.seed % len(variants)][1]]
    if mode.startswith("vmap"):  # the second example of the batch, any value
        second = make_extras(program.extras, program.seed + 1)
        inputs.append((-0.5 * program.s + 1.0, second))
        denses = [dense for _, dense in variants]
    for s, extras in inputs:
        if not math.isfinite(s) or not all(_finite(e) for e in extras):
            return True
    skel, literals = skeleton(program.ops)
    if any(isinstance(x, float | np.floating) and not np.isfinite(x) for x in literals):
        return True  # a literal operand (`x * nan`): no operation made it
    for dense in denses:
        for s, extras in inputs:
            with jax.ensure_compile_time_eval():
                outs = run_program(
                    skel, literals, dense, jnp.asarray(s, jnp.float32), extras
                )
            leaves = jtu.tree_leaves(outs)
            upto = len(leaves) if mode.startswith("grad") else err.index
            if not all(_finite(x) for x in leaves[:upto]):
                return True
    return False


def _finite(x: Any) -> bool:
    x = np.asarray(x)
    return not np.issubdtype(x.dtype, np.inexact) or bool(np.all(np.isfinite(x)))


def _check(
    mode: str, program: Program, variants: list[tuple[Any, Any]], twin: bool
) -> None:
    v, dense = variants[program.seed % len(variants)]
    refuses = materialise_refuses(v)
    more = MORE_DEFINED.get(type(v).__name__)
    more_defined = None if more is None else more[0]
    skel, literals = skeleton(program.ops)
    s = jnp.asarray(program.s, jnp.float32)
    extras = make_extras(program.extras, program.seed)

    if mode == "eager":
        # quaxify's own eager path (its compiled walk, and its trace cache: the twin
        # is the same skeleton with other literals).
        runs = [(mode, literals)]
        other = twin_program(program.ops) if twin else None
        if other is not None:
            runs.append(
                (
                    f"{mode}, the same program with every signed zero flipped",
                    skeleton(other)[1],
                )
            )
        for what, lits in runs:
            expected = fresh_jit(ft.partial(run_program, skel, lits), dense, s, extras)
            got = lambda: Q_RUN(skel, lits, v, s, extras)  # noqa: B023 -- called now
            judge(what, _outcome(got), _outcome(expected), refuses, more_defined)
        return
    quax_side, dense_side, args = _sides(
        mode, skel, literals, v, dense, s, extras, program, variants
    )
    both = _outcome(fresh_jit(lambda *a: (quax_side(*a), dense_side(*a)), *args))
    if both[0]:
        got, expected = both[1]
        judge(mode, (True, got), (True, expected), refuses, more_defined)
    else:  # one compile for both sides failed: find out which side raised
        judge(
            mode,
            _outcome(fresh_jit(quax_side, *args)),
            _outcome(fresh_jit(dense_side, *args)),
            refuses,
            more_defined,
        )


def _sides(mode, skel, literals, v, dense, s, extras, program, variants):
    """`(quax_side, dense_side, args)`: two functions of the same arguments, which
    must agree; they are compiled together, as one `jax.jit`."""
    if mode == "jit_outside":

        def quax_jit_outside(v, d, s, extras):
            return Q_RUN(skel, literals, v, s, extras)

        def dense_jit_outside(v, d, s, extras):
            return run_program(skel, literals, d, s, extras)

        return quax_jit_outside, dense_jit_outside, (v, dense, s, extras)
    if mode == "jit_inside":

        def quax_jit_inside(v, d, s, extras):
            inner = jax.jit(
                lambda v, s, extras: run_program(skel, literals, v, s, extras)
            )
            return quax.quaxify(inner)(v, s, extras)

        def dense_jit_inside(v, d, s, extras):
            return run_program(skel, literals, d, s, extras)

        return quax_jit_inside, dense_jit_inside, (v, dense, s, extras)
    if mode == "grad_outside":
        # The gradient w.r.t. the value's leaves goes through `materialise()` on the
        # dense side.
        diff, static = eqx.partition((v, s, extras), _inexact)

        def loss_quax(diff):
            v, s, extras = eqx.combine(diff, static)
            return total(densify(Q_RUN(skel, literals, v, s, extras)))

        def loss_dense(diff):
            v, s, extras = eqx.combine(diff, static)
            return total(run_program(skel, literals, densify(v), s, extras))

        # The gradients have the value's structure, filled with cotangents: compare
        # them leaf by leaf (never `materialise()` them).
        def grad_leaves(loss):
            return lambda diff: jtu.tree_leaves(jax.grad(loss)(diff))

        return grad_leaves(loss_quax), grad_leaves(loss_dense), (diff,)
    if mode == "grad_inside":
        wrt_v = bool(jnp.issubdtype(dense.dtype, jnp.inexact))

        def quax_grad_inside(v, d, s, extras):
            return Q_GRAD(skel, literals, v, s, extras, wrt_v)

        def dense_grad_inside(v, d, s, extras):
            return _grad_program(skel, literals, d, s, extras, wrt_v)

        return quax_grad_inside, dense_grad_inside, (v, dense, s, extras)
    # vmap: a batch of two, of s and the extras (and in vmap_outside of values).
    s2 = jnp.stack([s, jnp.asarray(-0.5 * program.s + 1.0, jnp.float32)])
    extras2 = _stack(extras, make_extras(program.extras, program.seed + 1))
    if mode == "vmap_outside":
        v_b, dense_b = v, dense
        for other in variants:
            if other[0] is not v and jtu.tree_structure(other[0]) == jtu.tree_structure(
                v
            ):
                v_b, dense_b = other
                break
        vs, denses = _stack(v, v_b), jnp.stack([dense, dense_b])

        def per_example(v, s, extras):
            return densify(Q_RUN(skel, literals, v, s, extras))

        def quax_vmap_outside(v, d, s, extras):
            return eqx.filter_vmap(per_example)(v, s, extras)

        def dense_vmap_outside(v, d, s, extras):
            return jax.vmap(ft.partial(run_program, skel, literals))(d, s, extras)

        return quax_vmap_outside, dense_vmap_outside, (vs, denses, s2, extras2)
    if mode == "vmap_inside":

        def quax_vmap_inside(v, d, s, extras):
            return Q_VMAP(skel, literals, v, s, extras)

        def dense_vmap_inside(v, d, s, extras):
            return _vmap_program(skel, literals, d, s, extras)

        return quax_vmap_inside, dense_vmap_inside, (v, dense, s2, extras2)
    raise ValueError(mode)
