"""`jit`: nested `jax.jit` calls (most `jax.numpy` functions make one).

A value reaching a `jit` equation is flattened to its leaves; the inner jaxpr is walked
on the values inside a fresh trace, and the result is emitted again as one `jit`
equation over the leaves, with the original name and params, so the compiled program
keeps the boundary. The walked jaxpr is cached per (inner jaxpr, operand treedefs and
leaf avals): a block called 32 times with the same LoRA weights is walked once.
"""

from typing import Any

import jax
import jax.core

from .. import _compat
from .._walker import TraceCache, bind, register, walk_closed
from ._common import (
    expand_per_operand,
    flatten_operands,
    leaf_specs,
    operands_key,
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
    leaves, spec = flatten_operands(invals)
    key = (closed, operands_key(leaves, spec))
    entry = JIT_TRACES.get(key)
    if entry is None:
        entry = _walk_to_jaxpr(closed, leaves, spec)
        if entry is None:
            # The walked body closed over tracers of an outer trace: inline it.
            return walk_closed(closed, invals)
        JIT_TRACES.put(key, *entry)
    new_closed, out_spec = entry
    params = dict(eqn.params, jaxpr=new_closed)
    for name in _PER_INPUT:
        if name in params:
            params[name] = expand_per_operand(params[name], spec)
    for name in _PER_OUTPUT:
        if name in params:
            params[name] = expand_per_operand(params[name], out_spec)
    out_leaves = bind(eqn, leaves, eqn.primitive.get_bind_params(params))
    return unflatten_operands(out_leaves, out_spec)


def _walk_to_jaxpr(closed: Any, leaves: list[Any], spec: Any) -> Any:
    box: list[Any] = []

    def body(*inner_leaves):
        outs = walk_closed(closed, unflatten_operands(inner_leaves, spec))
        out_leaves, out_spec = flatten_operands(outs)
        box.append(out_spec)
        return out_leaves

    new_closed = jax.make_jaxpr(body)(*leaf_specs(leaves))
    if any(isinstance(c, jax.core.Tracer) for c in new_closed.consts):
        return None
    return new_closed, box[0]
