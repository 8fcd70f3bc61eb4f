"""`jit`: nested `jax.jit` calls (most `jax.numpy` functions make one).

A value reaching a `jit` equation is flattened to its leaves; the inner jaxpr is walked
on the values inside a fresh trace, and the result is emitted again as one `jit`
equation over the leaves, with the original name and params, so the compiled program
keeps the boundary. The walked jaxpr is cached per (inner jaxpr, operand treedefs and
leaf avals): a block called 32 times with the same LoRA weights is walked once.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core as jexc
import numpy as np

from .. import _compat
from .._rewrite import EQN_REWRITERS, Val, as_reads, rewrite
from .._strict import STATE
from .._walker import (
    TraceCache,
    aval_key,
    bind,
    operands_key,
    register,
    static_key,
    treedef_key,
    walk_closed,
)
from ._common import (
    expand_per_operand,
    flatten_operands,
    leaf_specs,
    unflatten_operands,
)


#: Walked `jit` bodies. The key holds the inner ClosedJaxpr itself, which pins its
#: constants, so concrete array constants may be cached here.
JIT_TRACES = TraceCache(allow_array_consts=True)

_PER_INPUT = ("in_shardings", "in_layouts", "donated_invars")
_PER_OUTPUT = ("out_shardings", "out_layouts")


@register(_compat.jit_p)
def jit_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    closed = eqn.params["jaxpr"]
    # Scalar literals (`jnp.pad(x, 0)` passes its 0 into a `jit`) are folded into the
    # walked body, so handlers inside see them as concrete values.
    folded = tuple(_is_scalar_literal(x) for x in invals)
    dynamic = [x for x, f in zip(invals, folded, strict=True) if not f]
    leaves, spec = flatten_operands(dynamic)
    literals = tuple(
        _literal_key(x) if f else None for x, f in zip(invals, folded, strict=True)
    )
    # The walk depends on the strict mode; `quax.explain` walks every time.
    key = None
    if STATE.recorder is None:
        key = (closed, literals, operands_key(leaves, spec), STATE.mode)
    entry = JIT_TRACES.get(key)
    if entry is None:
        entry = walk_to_jaxpr(closed, invals, folded, leaves, spec)
        if entry is None:
            # The walked body closed over tracers of an outer trace: inline it.
            return walk_closed(closed, invals)
        JIT_TRACES.put(key, *entry)
    new_closed, out_spec = entry
    if not new_closed.jaxpr.eqns and _no_placement(eqn.params):
        # Nothing left to compute (e.g. every output is a symbolic zero) and no
        # sharding asked of the results: emit no empty `jit` shell, just forward.
        out_leaves = jax.core.eval_jaxpr(new_closed.jaxpr, new_closed.consts, *leaves)
        return unflatten_operands(out_leaves, out_spec)
    params = _params(eqn, new_closed, folded, spec, out_spec)
    out_leaves = bind(eqn, leaves, eqn.primitive.get_bind_params(params))
    return unflatten_operands(out_leaves, out_spec)


def rewrite_jit(
    eqn: Any, reads: list[Any]
) -> tuple[Any, list[Any], list[tuple[Any, Any]]] | None:
    """A `jit` equation met in a rewrite (`quax._rewrite`) whose walked body is
    cached: the same `jit` equation over the leaves, made directly, with no trace.
    The key is `jit_handler`'s, from the operands' avals; None (and a fragment runs
    `jit_handler`) on a miss, or for operands `jit_handler` would see as constants."""
    if STATE.recorder is not None:
        return None
    atoms: list[Any] = []
    spec: list[Any] = []
    folded: list[bool] = []
    literals: list[Any] = []
    for r in reads:
        if type(r) is jexc.Literal:
            folded.append(True)
            literals.append(_literal_key(r.val))
            continue
        folded.append(False)
        literals.append(None)
        if type(r) is Val:
            if any(type(a) is not jexc.Var for a in r.atoms):
                return None
            atoms.extend(r.atoms)
            spec.append((r.treedef, len(r.atoms)))
        elif type(r) is jexc.Var:
            atoms.append(r)
            spec.append(None)
        else:
            return None
    spec_t = tuple(spec)
    spec_key = tuple(None if s is None else (treedef_key(s[0]), s[1]) for s in spec)
    avals = tuple(aval_key(a.aval) for a in atoms)
    key = (eqn.params["jaxpr"], tuple(literals), (spec_key, avals), STATE.mode)
    entry = JIT_TRACES.get(key, probe=True)
    if entry is None:
        return None
    new_closed, out_spec = entry
    if not new_closed.jaxpr.eqns:
        return None  # `jit_handler` forwards; leave it to it
    params = _params(eqn, new_closed, folded, spec_t, out_spec)
    outvars = [jexc.Var(a) for a in new_closed.out_avals]
    new_eqn = jexc.new_jaxpr_eqn(
        atoms,
        outvars,
        eqn.primitive,
        params,
        new_closed.effects,
        eqn.source_info,
        eqn.ctx,
    )
    return new_eqn, as_reads(out_spec, iter(outvars)), []


def _params(
    eqn: Any, new_closed: Any, folded: Sequence[bool], spec: Any, out_spec: Any
) -> dict[str, Any]:
    """`eqn`'s params for a call of `new_closed` over the leaves: per-operand params
    repeated per leaf, those of folded operands dropped."""
    params = dict(eqn.params, jaxpr=new_closed)
    for name in _PER_INPUT:
        if name in params:
            kept = [p for p, f in zip(params[name], folded, strict=True) if not f]
            params[name] = expand_per_operand(kept, spec)
    for name in _PER_OUTPUT:
        if name in params:
            params[name] = expand_per_operand(params[name], out_spec)
    return params


EQN_REWRITERS[_compat.jit_p] = rewrite_jit


def _no_placement(params: dict[str, Any]) -> bool:
    shardings = (*params.get("in_shardings", ()), *params.get("out_shardings", ()))
    return all(_compat.is_unspecified_sharding(s) for s in shardings)


def _is_scalar_literal(x: Any) -> bool:
    # Literals are numpy values or Python scalar subclasses, never `jax.Array`s.
    return (
        isinstance(x, np.ndarray | np.generic | int | float | complex)
        and np.ndim(x) == 0
    )


def _literal_key(x: Any) -> Any:
    # By bits, type and weak type: `0.0` and `-0.0`, `1` and `True`, or two NaN
    # payloads fold into different programs.
    aval = jax.typeof(x)
    return (static_key(x), aval.dtype, getattr(aval, "weak_type", False))


def walk_to_jaxpr(
    closed: Any,
    invals: Sequence[Any],
    folded: Sequence[bool],
    leaves: list[Any],
    spec: Any,
) -> tuple[Any, Any] | None:
    """`closed` walked on `invals` inside a fresh trace: a ClosedJaxpr over `leaves`
    (the flattened `invals` not `folded` into the body), and how to rebuild the
    outputs from its results; None if the walk closed over tracers of an outer trace
    (the result then cannot be reused or bound on its own). Rewritten without
    tracing what no value reaches (`quax._rewrite`) where it can be."""
    got = rewrite(closed, invals, folded, leaves, spec, "jit")
    if got is not None:
        new_closed, out_spec, hoisted = got
        return None if hoisted else (new_closed, out_spec)
    box: list[Any] = []

    def body(*inner_leaves):
        inner = iter(unflatten_operands(inner_leaves, spec))
        operands = [
            x if f else next(inner) for x, f in zip(invals, folded, strict=True)
        ]
        outs = walk_closed(closed, operands)
        out_leaves, out_spec = flatten_operands(outs)
        box.append(out_spec)
        return out_leaves

    new_closed = jax.make_jaxpr(body)(*leaf_specs(leaves))
    if any(isinstance(c, jax.core.Tracer) for c in new_closed.consts):
        return None
    return new_closed, box[0]


def jit_params(name: str, closed: Any) -> dict[str, Any]:
    """The params of a `jit` equation calling `closed` (every operand and result
    unplaced, nothing donated), as `jax.jit` would make them in the current context
    (its mesh, ...). Built from a traced `jax.jit` call: JAX has no public
    constructor for them."""
    context = _compat.trace_context()
    template = _TEMPLATES.get(context)
    if template is None:
        (eqn,) = jax.make_jaxpr(jax.jit(_one_op))(np.float32(0)).jaxpr.eqns
        template = _TEMPLATES[context] = eqn.params
    params = dict(template)
    n_in, n_out = len(closed.in_avals), len(closed.out_avals)
    for per, n in ((_PER_INPUT, n_in), (_PER_OUTPUT, n_out)):
        for param in per:
            if param in params:
                params[param] = (params[param][0],) * n
    params.update(jaxpr=closed, name=name)
    return params


#: `jit` params per tracing context (mesh, config), as `jit_params` copies them.
_TEMPLATES: dict[Any, dict[str, Any]] = {}


def _one_op(x: Any) -> Any:
    return x + 1
