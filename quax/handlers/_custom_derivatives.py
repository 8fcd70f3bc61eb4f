"""`custom_jvp_call` and `custom_vjp_call`: custom derivative rules with values.

- **Nothing to differentiate.** When no operand has an inexact leaf (a `Zero`, an
  integer-valued type), no tangent can reach the call: its jaxpr is walked on the
  values and its outputs are returned as they are, so `relu(Zero)` is a `Zero`.
- **Otherwise the rule is kept.** The call is emitted again as a new `jax.custom_jvp`
  (or `jax.custom_vjp`) over the operands' leaves, whose primal walks the call's
  jaxpr on the values (handlers run inside) and whose rule is the original one. This
  holds even when nothing is being differentiated yet: `jax.grad(jax.jit(f))` traces
  `f` before differentiating it, so only the rule in the program keeps its numbers.
- **Output values stay values when their tangent has somewhere to go**: the value
  carries no derivative (no inexact leaf and no inexact dtype), or its class lifts a
  dense tangent onto its leaves (`ArrayValue.lift_tangent`, a right inverse of
  `pushforward`; a cotangent goes back by its transpose). Any other output is
  materialised, so the rule's dense tangent or cotangent lands on a dense array.
- **Only what is perturbed is differentiated.** A dense operand is perturbed when one
  of its leaves is; the rule is asked for exactly those (`symbolic_zeros`), so a
  frozen weight, a closed-over constant or a non-differentiable argument never
  arrives perturbed (equinox's `filter_custom_vjp` asserts this).
- **The rule runs on the values.** `custom_jvp`: the rule's JVP jaxpr is walked with
  the values as primals; a value's tangent is `value.pushforward(leaf_tangents)`.
  `custom_vjp`: the rule's forward jaxpr is walked with the values (its residuals may
  be values), the backward pass is traced and walked on those residuals, and a value
  operand's dense cotangent goes back onto its leaves with `value.pullback(ct)`. So a
  value used only through handlers (a LoRA weight in matrix products) is never
  materialised, in the primal or in the derivative. Where the rule's primal output is
  not the value the primal keeps (a rule computing it another way), the primal's is
  used: JAX asks the two to be equal.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.custom_derivatives import SymbolicZero

from .. import _compat
from .._errors import QuaxError
from .._values import ArrayValue, Value, aval_of
from .._walker import eqn_context, register, walk, walk_closed
from ._common import (
    OperandSpec,
    dense,
    flatten_operands,
    leaf_specs,
    unflatten_operands,
    value_type,
)


# -- one call: its operands, their leaves, its outputs --------------------------------


class _Call:
    """A `custom_jvp_call`/`custom_vjp_call` equation and the layout of its operands.

    The rules JAX keeps for the new custom function close over this object, so it
    holds no array of the trace (only shapes and dtypes): a rule may outlive it.
    """

    def __init__(self, eqn: Any, leaves: list[Any], spec: OperandSpec):
        self.eqn = eqn
        self.num_consts: int = eqn.params["num_consts"]
        self.spec = spec
        self.leaf_specs = leaf_specs(leaves)
        # For error messages only: the operands with abstract leaves.
        self.abstract_operands = unflatten_operands(self.leaf_specs, spec)
        self.out_spec: Any = None
        self._out_types: tuple[Any, ...] | None = None

    def operands(self, leaves: Sequence[Any]) -> list[Any]:
        return unflatten_operands(leaves, self.spec)

    def leaf_groups(self, leaves: Sequence[Any]) -> list[list[Any]]:
        """`leaves` (one per leaf of the operands) grouped per operand."""
        groups, it = [], iter(leaves)
        for s in self.spec:
            groups.append([next(it) for _ in range(1 if s is None else s[1])])
        return groups

    def walk_primal(self, leaves: Sequence[Any]) -> list[Any]:
        """The call's jaxpr walked on the operands, given as leaves."""
        return walk_closed(self.eqn.params["call_jaxpr"], self.operands(leaves))

    def primal(self, *leaves: Any) -> list[Any]:
        """The new custom function's primal: the walked call, its outputs as leaves
        (kept values flattened, the others materialised)."""
        outs = [x if _keeps(x) else self.dense(x) for x in self.walk_primal(leaves)]
        self._out_types = tuple(value_type(x) for x in outs)
        out_leaves, self.out_spec = flatten_operands(outs)
        return out_leaves

    def out_types(self) -> tuple[Any, ...]:
        """Per output of the primal: None if materialised, else the kept value's
        `value_type`; found by tracing the primal if it has not run (the rule may be
        traced first)."""
        if self._out_types is None:
            jax.eval_shape(self.primal, *self.leaf_specs)
        assert self._out_types is not None
        return self._out_types

    def follow(self, outs: Sequence[Any], leaves: Sequence[Any]) -> list[Any]:
        """A rule's primal outputs `outs` as the primal returns them: materialised
        where it materialises; where it keeps a value, the rule's own output if it is
        a value of the same type, else the primal's (walked again on `leaves`)."""
        again: list[Any] | None = None
        result = []
        for i, (x, kind) in enumerate(zip(outs, self.out_types(), strict=True)):
            if kind is None:
                result.append(self.dense(x))
            elif value_type(x) == kind:
                result.append(x)
            else:
                if again is None:
                    again = self.walk_primal(leaves)
                result.append(again[i])
        return result

    def dense(self, x: Any) -> Any:
        return dense(x, self.eqn, self.abstract_operands)

    def outputs(self, out_leaves: Sequence[Any]) -> list[Any]:
        return unflatten_operands(out_leaves, self.out_spec)


def _constant(eqn: Any, invals: list[Any]) -> list[Any] | None:
    """The call's outputs, values kept, when no operand has an inexact leaf (no
    tangent can reach it, so its rule never runs); else None."""
    leaves, _ = flatten_operands(invals)
    if any(_inexact(leaf) for leaf in leaves):
        return None
    return walk_closed(eqn.params["call_jaxpr"], invals)


def _keeps(x: Any) -> bool:
    """Whether an output of the primal stays a value: it carries no derivative, or
    its class lifts any dense tangent onto its leaves."""
    return isinstance(x, Value) and (_carries_no_derivative(x) or _lifts(x))


def _carries_no_derivative(x: Value) -> bool:
    """A value whose dense tangent is always zero (`float0`): no inexact dtype."""
    return not jnp.issubdtype(aval_of(x).dtype, jnp.inexact)


def _lifts(x: Value) -> bool:
    """Whether `x.lift_tangent` answers (traced on an abstract tangent, once per
    primal): a class that does not override it never does."""
    if not isinstance(x, ArrayValue):
        return False
    if type(x).lift_tangent is ArrayValue.lift_tangent:
        return False
    if not any(_inexact(leaf) for leaf in jtu.tree_leaves(x)):
        return False
    answers: list[bool] = []

    def probe(tangent: Any) -> None:
        answers.append(x.lift_tangent(tangent) is not None)

    jax.eval_shape(probe, _tangent_spec(x))
    return answers[0]


def _tangent_spec(x: Value) -> jax.ShapeDtypeStruct:
    aval = aval_of(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.to_tangent_aval().dtype)


def _lifted(x: Any, tangent: Any) -> list[Any]:
    """`x.lift_tangent(tangent)` as one entry per leaf of `x` (None: no tangent),
    checked against the leaves' tangent types."""
    out = x.lift_tangent(tangent)
    leaves, treedef = jtu.tree_flatten(x)
    ok = out is not None and jtu.tree_structure(out, is_leaf=_is_none) == treedef
    lifted = jtu.tree_leaves(out, is_leaf=_is_none) if ok else []
    ok = ok and all(
        t is None
        or _shape_dtype(jax.typeof(t)) == _shape_dtype(_leaf_tangent_aval(leaf))
        for leaf, t in zip(leaves, lifted, strict=True)
    )
    if not ok:
        raise QuaxError(
            _MSG_BAD_LIFT.format(
                cls=type(x).__name__,
                tangent=jax.typeof(tangent).str_short(),
                leaves=[_leaf_tangent_aval(leaf).str_short() for leaf in leaves],
                got=jtu.tree_map(
                    lambda t: None if t is None else jax.typeof(t).str_short(),
                    out,
                    is_leaf=_is_none,
                ),
            )
        )
    return lifted


def _lift(x: Any, tangent: Any) -> list[Any]:
    """The tangents of output value `x`'s leaves given its dense `tangent`."""
    lifted = _lifted(x, tangent)
    return [
        _tangent_zero(leaf) if t is None or not _inexact(leaf) else t
        for leaf, t in zip(jtu.tree_leaves(x), lifted, strict=True)
    ]


def _lift_transpose(x: Any, leaf_cts: Sequence[Any]) -> Any:
    """The dense cotangent of output value `x` given its leaves' cotangents, by
    transposing its `lift_tangent`; None when they are all zero."""
    leaves = jtu.tree_leaves(x)
    moving = [
        i
        for i, (leaf, ct) in enumerate(zip(leaves, leaf_cts, strict=True))
        if _inexact(leaf) and not (ct is None or isinstance(ct, SymbolicZero))
    ]
    if not moving:
        return None

    def lifted(tangent: Any) -> list[Any]:
        ts = _lifted(x, tangent)
        out = []
        for i in moving:
            aval = _leaf_tangent_aval(leaves[i])
            out.append(jnp.zeros(aval.shape, aval.dtype) if ts[i] is None else ts[i])
        return out

    spec = _tangent_spec(x)
    _, pull = jax.vjp(lifted, jnp.zeros(spec.shape, spec.dtype))
    return pull([leaf_cts[i] for i in moving])[0]


def _shape_dtype(aval: Any) -> tuple[Any, ...]:
    return tuple(aval.shape), aval.dtype


def _leaf_tangent_aval(leaf: Any) -> Any:
    return jax.typeof(leaf).strip_weak_type().to_tangent_aval()


def _is_none(x: Any) -> bool:
    return x is None


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(jax.typeof(x).dtype, jnp.inexact)


def _instantiate(t: Any) -> Any:
    """A tangent or cotangent as an array (a `SymbolicZero` becomes zeros)."""
    if isinstance(t, SymbolicZero):
        aval: Any = t.aval
        if aval.dtype == jax.dtypes.float0:
            return np.zeros(aval.shape, jax.dtypes.float0)
        return jnp.zeros(aval.shape, aval.dtype)
    return t


def _tangent_zero(x: Any) -> SymbolicZero:
    return SymbolicZero(jax.typeof(x).to_tangent_aval())


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.core.Tracer | np.ndarray | np.generic)


# -- custom_jvp ---------------------------------------------------------------------


@register(_compat.custom_jvp_call_p)
def custom_jvp_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    constant = _constant(eqn, invals)
    if constant is not None:
        return constant
    leaves, spec = flatten_operands(invals)
    call = _Call(eqn, leaves, spec)
    fn = jax.custom_jvp(call.primal)
    fn.defjvp(
        lambda primals, tangents: _jvp(call, primals, tangents), symbolic_zeros=True
    )
    with eqn_context(eqn):
        out = fn(*leaves)
    return call.outputs(out)


def _jvp(call: _Call, primals: Sequence[Any], tangents: Sequence[Any]) -> Any:
    """The original rule's JVP jaxpr, walked with the values as primals."""
    operands = call.operands(primals)
    groups = call.leaf_groups(tangents)
    args = operands[call.num_consts :]
    zeros: list[bool] = []
    dense_tangents: list[Any] = []
    for x, ts in list(zip(operands, groups, strict=True))[call.num_consts :]:
        zero = all(isinstance(t, SymbolicZero) for t in ts)
        zeros.append(zero)
        dense_tangents.append(None if zero else _push(x, ts))
    if not call.eqn.params["symbolic_zeros"]:
        # The rule expects every tangent as an array.
        dense_tangents = [
            jnp.zeros(_dense_aval(x).shape, _dense_aval(x).dtype) if t is None else t
            for x, t in zip(args, dense_tangents, strict=True)
        ]
        zeros = [False] * len(zeros)
    jvp_jaxpr, jvp_consts, out_zeros = call.eqn.params["jvp_jaxpr_fun"].call_wrapped(
        *zeros
    )
    nonzero = [t for t in dense_tangents if t is not None]
    outs = walk(jvp_jaxpr, jvp_consts, [*args, *nonzero])
    out_primals = call.follow(outs[: len(out_zeros)], primals)
    tangent_it = iter(outs[len(out_zeros) :])
    primal_leaves: list[Any] = []
    tangent_leaves: list[Any] = []
    for kind, p, z in zip(call.out_types(), out_primals, out_zeros, strict=True):
        t = None if z else next(tangent_it)
        leaves = [p] if kind is None else jtu.tree_leaves(p)
        primal_leaves.extend(leaves)
        if t is None or (kind is not None and _carries_no_derivative(p)):
            tangent_leaves.extend(_tangent_zero(leaf) for leaf in leaves)
        elif kind is None:
            tangent_leaves.append(call.dense(t))
        else:  # a kept value: the rule's dense tangent lifted onto its leaves
            tangent_leaves.extend(_lift(p, call.dense(t)))
    return primal_leaves, tangent_leaves


def _dense_aval(x: Any) -> Any:
    return aval_of(x) if isinstance(x, Value) else jax.typeof(x)


def _push(x: Any, leaf_tangents: list[Any]) -> Any:
    """The dense tangent of operand `x` given its leaves' tangents."""
    if not isinstance(x, Value):
        (t,) = leaf_tangents
        return _instantiate(t)
    treedef = jtu.tree_structure(x)
    tangent = jtu.tree_unflatten(treedef, [_instantiate(t) for t in leaf_tangents])
    if isinstance(x, ArrayValue):
        return x.pushforward(tangent)
    # A `Value` that is no `ArrayValue`: the default, through `materialise()`.
    return ArrayValue.pushforward(x, tangent)  # pyright: ignore[reportArgumentType]


# -- custom_vjp ---------------------------------------------------------------------


@register(_compat.custom_vjp_call_p)
def custom_vjp_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    constant = _constant(eqn, invals)
    if constant is not None:
        return constant
    leaves, spec = flatten_operands(invals)
    call = _Call(eqn, leaves, spec)
    fn = jax.custom_vjp(call.primal)
    fn.defvjp(
        lambda *primals: _fwd(call, primals),
        lambda res, cts: _bwd(call, res, cts),
        symbolic_zeros=True,
    )
    with eqn_context(eqn):
        out = fn(*leaves)
    return call.outputs(out)


def _fwd(call: _Call, primals: Sequence[Any]) -> tuple[list[Any], Any]:
    """The original forward rule's jaxpr, walked with the values; only the perturbed
    operands are declared perturbed to it."""
    leaves = [p.value for p in primals]
    operands = call.operands(leaves)
    perturbed = [
        any(p.perturbed for p in group) for group in call.leaf_groups(list(primals))
    ]
    if any(perturbed[: call.num_consts]):
        raise QuaxError(_MSG_CLOSED_OVER)
    args = operands[call.num_consts :]
    nonzeros = perturbed[call.num_consts :]
    fwd_jaxpr, fwd_consts = call.eqn.params["fwd_jaxpr_thunk"].call_wrapped(*nonzeros)
    res_and_outs = walk(fwd_jaxpr, fwd_consts, args)
    _, res_tree, input_fwds = call.eqn.params["out_trees"]()
    num_res_out = res_tree.num_leaves - sum(f is not None for f in input_fwds)
    res_out, outs = res_and_outs[:num_res_out], res_and_outs[num_res_out:]
    res_it = iter(res_out)
    residuals = [next(res_it) if f is None else args[f] for f in input_fwds]
    outs = call.follow(outs, leaves)
    out_leaves, _ = flatten_operands(outs)
    # The value operands are kept for `pullback`, and the lifted output values for
    # transposing their `lift_tangent`; plain ones are not needed.
    values = [
        x if isinstance(x, Value) and nz else None
        for x, nz in zip(args, nonzeros, strict=True)
    ]
    lifted = [
        None if kind is None or _carries_no_derivative(x) else x
        for x, kind in zip(outs, call.out_types(), strict=True)
    ]
    return out_leaves, (residuals, values, lifted)


def _bwd(call: _Call, res: Any, cts: Sequence[Any]) -> tuple[Any, ...]:
    """The original backward rule, traced and walked on the (possibly value)
    residuals; each value operand's dense cotangent is pulled back onto its leaves."""
    residuals, values, lifted = res
    ct_it = iter(cts)
    out_cts: list[Any] = []
    for kind, x in zip(call.out_types(), lifted, strict=True):
        if kind is None:
            out_cts.append(next(ct_it))
            continue
        leaf_cts = [next(ct_it) for _ in kind[1]]
        # A kept value: its leaves' cotangents back through its `lift_tangent`
        # (one that carries no derivative has none).
        out_cts.append(None if x is None else _lift_transpose(x, leaf_cts))
    out_avals = [
        jax.core.ShapedArray(v.aval.shape, v.aval.dtype)
        for v in call.eqn.params["call_jaxpr"].jaxpr.outvars
    ]
    symbolic = call.eqn.params["symbolic_zeros"]
    arg_cts = _walk_fn(
        lambda residuals, cts: _call_bwd(call, residuals, cts, out_avals, symbolic),
        residuals,
        out_cts,
    )
    leaf_cts: list[Any] = []
    for s in call.spec[: call.num_consts]:
        leaf_cts.extend([None] * (1 if s is None else s[1]))
    args = call.spec[call.num_consts :]
    for s, x, ct in zip(args, values, arg_cts, strict=True):
        if s is None:
            leaf_cts.append(None if ct is None else call.dense(ct))
        elif ct is None or x is None:
            leaf_cts.extend([None] * s[1])
        else:
            leaf_cts.extend(_pull(call, x, ct))
    return tuple(leaf_cts)


def _call_bwd(call: _Call, residuals, cts, out_avals, symbolic: bool) -> list[Any]:
    """The original `bwd` on dense cotangents: `None` for a zero in, and out."""
    ct_args = []
    for ct, aval in zip(cts, out_avals, strict=True):
        if ct is None or isinstance(ct, SymbolicZero):
            zero = SymbolicZero(aval.to_tangent_aval())
            ct_args.append(zero if symbolic else _instantiate(zero))
        else:
            ct_args.append(ct)
    out = call.eqn.params["bwd"].call_wrapped(*residuals, *ct_args)
    return [ct if _is_array(ct) else None for ct in out]


def _pull(call: _Call, x: Value, ct: Any) -> list[Any]:
    """The leaf cotangents of value operand `x` given its dense cotangent."""
    ct = call.dense(ct)
    try:
        if isinstance(x, ArrayValue):
            pulled = x.pullback(ct)
        else:  # a `Value` that is no `ArrayValue`: the default, through materialise
            pulled = ArrayValue.pullback(x, ct)  # pyright: ignore[reportArgumentType]
    except QuaxError:
        raise
    except Exception:
        call.dense(x)  # a refusal to materialise: the standard error, naming `eqn`
        raise
    return jtu.tree_leaves(pulled, is_leaf=lambda c: c is None)


def _walk_fn(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with values among `args`: traced on their avals and walked, so
    handlers run (as `quaxify`, without its cache: `fn` is made per call)."""
    leaves, treedef = jtu.tree_flatten(args, is_leaf=lambda x: isinstance(x, Value))
    dynamic = [i for i, x in enumerate(leaves) if isinstance(x, Value) or _is_array(x)]
    box: list[Any] = []

    def flat(*dyn):
        new = list(leaves)
        for i, x in zip(dynamic, dyn, strict=True):
            new[i] = x
        out = fn(*jtu.tree_unflatten(treedef, new))
        out_leaves, out_tree = jtu.tree_flatten(out)
        box.append(out_tree)
        return out_leaves

    specs = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
        for a in (_dense_aval(leaves[i]) for i in dynamic)
    ]
    closed = jax.make_jaxpr(flat)(*specs)
    outs = walk_closed(closed, [leaves[i] for i in dynamic])
    return jtu.tree_unflatten(box[0], outs)


_MSG_CLOSED_OVER = """\
quax: a `jax.custom_vjp` function is differentiated with respect to a value it \
closes over; its rule gives cotangents for its explicit arguments only.
To fix: pass the value to the `custom_vjp` function as an argument."""

_MSG_BAD_LIFT = """\
quax: `{cls}.lift_tangent` must return tangents for the value's leaves: a pytree \
like the value (the same class and static fields) holding, per leaf, None or an \
array of that leaf's tangent type ({leaves}). Given a tangent {tangent}, it \
returned {got}.
To fix: return `None` from `lift_tangent` if this value cannot carry every tangent \
(quax then materialises it), else one tangent per leaf."""
