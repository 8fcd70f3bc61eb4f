"""`custom_jvp_call` and `custom_vjp_call`: custom derivative rules with values.

A call with values among its operands is emitted again as a new `jax.custom_jvp` (or
`jax.custom_vjp`) over the operands' leaves, so the outer program differentiates the
leaves, and the original rule stays the derivative:

- **Primal.** The call's jaxpr is walked on the values, so handlers run inside. An
  output stays a value when it carries no derivative (no inexact leaf and no inexact
  dtype: a `Zero`, an integer-valued type), or, for `custom_jvp`, when its class can
  `join` a plain array into its kind (`ArrayValue.join`): the output is joined into
  that kind and the rule's dense tangent rides on the leaves `join` gives it (LoRA:
  the weight's tangent on an unfrozen `w`). Any other output is materialised, so the
  rule's dense tangent or cotangent has somewhere to go.
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
  materialised, in the primal or in the derivative.
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
    join_kinds,
    join_to,
    leaf_specs,
    unflatten_operands,
)


# -- one call: its operands, their leaves, its outputs --------------------------------


class _Call:
    """A `custom_jvp_call`/`custom_vjp_call` equation and the layout of its operands.

    The rules JAX keeps for the new custom function close over this object, so it
    holds no array of the trace (only shapes and dtypes): a rule may outlive it.
    """

    def __init__(
        self, eqn: Any, leaves: list[Any], spec: OperandSpec, join: bool = False
    ):
        self.eqn = eqn
        self.num_consts: int = eqn.params["num_consts"]
        self.spec = spec
        self.leaf_specs = leaf_specs(leaves)
        # For error messages only: the operands with abstract leaves.
        self.abstract_operands = unflatten_operands(self.leaf_specs, spec)
        self.out_spec: Any = None
        # Per output, with `join` (custom_jvp): the kind a value output is joined
        # into (an abstract example), else None.
        self.join = join
        self.joins: list[Any] = []

    def operands(self, leaves: Sequence[Any]) -> list[Any]:
        return unflatten_operands(leaves, self.spec)

    def leaf_groups(self, leaves: Sequence[Any]) -> list[list[Any]]:
        """`leaves` (one per leaf of the operands) grouped per operand."""
        groups, it = [], iter(leaves)
        for s in self.spec:
            groups.append([next(it) for _ in range(1 if s is None else s[1])])
        return groups

    def primal(self, *leaves: Any) -> list[Any]:
        """The walked call, as leaves: the new custom function's primal."""
        outs = walk_closed(self.eqn.params["call_jaxpr"], self.operands(leaves))
        return self.out_leaves(outs)

    def out_leaves(self, outs: list[Any], follow: bool = False) -> list[Any]:
        """Outputs as flat leaves: kept values flattened, the rest materialised. With
        `follow`, the derivative rule's outputs are kept where the primal's were."""
        if follow:
            kept = [s is not None for s in self.out_kinds()]
            outs = [
                x if t is None else join_to(t, x, self.eqn, outs)
                for x, t in zip(outs, self.joins, strict=True)
            ]
        else:
            kept = [_carries_no_derivative(x) for x in outs]
            self.joins = [
                _join_target(x) if self.join and not k else None
                for x, k in zip(outs, kept, strict=True)
            ]
            outs = [
                x if t is None else join_to(t, x, self.eqn, outs)
                for x, t in zip(outs, self.joins, strict=True)
            ]
            kept = [k or t is not None for k, t in zip(kept, self.joins, strict=True)]
        outs = [x if k else self.dense(x) for x, k in zip(outs, kept, strict=True)]
        leaves, spec = flatten_operands(outs)
        if self.out_spec is None:
            self.out_spec = spec
        return leaves

    def out_kinds(self) -> Any:
        """Per output of the primal: None if materialised, else the kept value's
        `(treedef, leaf count)`; found by tracing the primal if it has not run (the
        derivative rule may be traced first)."""
        if self.out_spec is None:
            jax.eval_shape(self.primal, *self.leaf_specs)
        return self.out_spec

    def dense(self, x: Any) -> Any:
        return dense(x, self.eqn, self.abstract_operands)

    def outputs(self, out_leaves: Sequence[Any]) -> list[Any]:
        return unflatten_operands(out_leaves, self.out_spec)


def _carries_no_derivative(x: Any) -> bool:
    """A value whose tangent is always zero, so it may leave a custom rule as is: no
    inexact leaves, and either no leaves at all (a symbolic constant such as `Zero`)
    or no inexact dtype (its dense tangent is `float0`)."""
    if not isinstance(x, Value):
        return False
    leaves = jtu.tree_leaves(x)
    if any(_inexact(leaf) for leaf in leaves):
        return False
    return not leaves or not jnp.issubdtype(aval_of(x).dtype, jnp.inexact)


def _join_target(x: Any) -> Any:
    """The kind (an abstract example) that value `x` and a plain array of its shape
    and dtype both join into, or None (a plain array, or a class that cannot)."""
    if not isinstance(x, ArrayValue):
        return None
    aval = aval_of(x)
    return join_kinds([x, jax.ShapeDtypeStruct(aval.shape, aval.dtype)])


def _join_tangent(target: Any, t: Any) -> list[Any]:
    """The leaf tangents that carry the dense tangent `t` on a value of `target`'s
    kind: the tangent of `target.join` (affine in the array it joins) along `t`."""
    zero = jnp.zeros(jnp.shape(t), jnp.result_type(t))
    _, tangent = jax.jvp(lambda d: target.join(d), (zero,), (t,))
    return jtu.tree_leaves(tangent)


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
    leaves, spec = flatten_operands(invals)
    call = _Call(eqn, leaves, spec, join=True)
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
    out_primals, nz_tangents = outs[: len(out_zeros)], outs[len(out_zeros) :]
    kinds = call.out_kinds()
    primal_leaves = call.out_leaves(out_primals, follow=True)
    tangent_it = iter(nz_tangents)
    tangent_leaves: list[Any] = []
    for kind, p, z, target in zip(
        kinds, out_primals, out_zeros, call.joins, strict=True
    ):
        t = None if z else next(tangent_it)
        if kind is not None and target is not None and t is not None:
            tangent_leaves.extend(_join_tangent(target, call.dense(t)))
        elif kind is not None:  # no derivative here: zero tangents
            p = p if target is None else join_to(target, p, call.eqn)
            tangent_leaves.extend(_tangent_zero(leaf) for leaf in jtu.tree_leaves(p))
        elif t is None:
            tangent_leaves.append(_tangent_zero(call.dense(p)))
        else:
            tangent_leaves.append(call.dense(t))
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
    out_leaves = call.out_leaves(outs, follow=True)
    # The value operands are kept for `pullback`; plain ones are not needed.
    values = [
        x if isinstance(x, Value) and nz else None
        for x, nz in zip(args, nonzeros, strict=True)
    ]
    return out_leaves, (residuals, values)


def _bwd(call: _Call, res: Any, cts: Sequence[Any]) -> tuple[Any, ...]:
    """The original backward rule, traced and walked on the (possibly value)
    residuals; each value operand's dense cotangent is pulled back onto its leaves."""
    residuals, values = res
    ct_it = iter(cts)
    out_cts: list[Any] = []
    for kind in call.out_kinds():
        if kind is not None:  # a kept value carries no derivative
            for _ in range(kind[1]):
                next(ct_it)
            out_cts.append(None)
        else:
            out_cts.append(next(ct_it))
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
