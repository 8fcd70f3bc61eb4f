"""`remat2` (`jax.checkpoint` / `jax.remat`), and the call primitives `closed_call`
and `call`.

A checkpointed body is walked on the values inside a fresh trace and emitted again as
one `remat2` over the flattened leaves, keeping `prevent_cse`, `differentiated` and
`policy`, so values stay values across the boundary and rematerialisation still
happens. Call primitives (JAX internals) are walked inline. `jax.named_call` and
`jax.named_scope` are not primitives: they live in each equation's name stack, which
the walker keeps.
"""

from typing import Any

import jax

from .. import _compat
from .._strict import STATE
from .._walker import TraceCache, operands_key, register, walk
from ._common import flatten_operands, leaf_specs, unflatten_operands


#: Walked checkpoint bodies, keyed by (inner jaxpr, operand treedefs and leaf avals).
REMAT_TRACES = TraceCache(allow_array_consts=True)


@register(_compat.remat_p)
def remat_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    jaxpr = eqn.params["jaxpr"]  # an open jaxpr: closed-over values are operands
    leaves, spec = flatten_operands(invals)
    key = None  # the walk depends on the strict mode; `quax.explain` walks each time
    if STATE.recorder is None:
        key = (jaxpr, operands_key(leaves, spec), STATE.mode)
    entry = REMAT_TRACES.get(key)
    if entry is None:
        box: list[Any] = []

        def body(*inner_leaves: Any) -> list[Any]:
            outs = walk(jaxpr, (), unflatten_operands(inner_leaves, spec))
            out_leaves, out_spec = flatten_operands(outs)
            box.append(out_spec)
            return out_leaves

        closed = jax.make_jaxpr(body)(*leaf_specs(leaves))
        entry = (closed, box[0])
        REMAT_TRACES.put(key, *entry)
    closed, out_spec = entry
    params = dict(eqn.params, jaxpr=_compat.convert_constvars_jaxpr(closed.jaxpr))
    # Runs inside the context `run_eqn` set for `eqn`: the new `remat2` keeps its line.
    out_leaves = eqn.primitive.bind(*closed.consts, *leaves, **params)
    return unflatten_operands(out_leaves, out_spec)


@register(_compat.closed_call_p, _compat.call_p)
def call_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    # `closed_call` holds a ClosedJaxpr, `call` an open one (a `Jaxpr` on JAX 0.11).
    call_jaxpr = eqn.params["call_jaxpr"]
    jaxpr = getattr(call_jaxpr, "jaxpr", call_jaxpr)
    return walk(jaxpr, getattr(call_jaxpr, "consts", ()), invals)
