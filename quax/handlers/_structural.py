"""`stop_gradient`, `optimization_barrier`, `name` (`checkpoint_name`) and `copy`
(`jnp.array(x, copy=True)`, equinox's loops): identities
on values, applied leaf by leaf, so a value stays a value.

Each is the identity on its operands' primal values, so applying it to every leaf of
a value gives the value the primitive would give its `materialise()`: no gradient
through any leaf, one barrier over all leaves, every leaf named for the remat policy.
"""

from typing import Any

import jax
import jax.tree_util as jtu

from .. import _compat
from .._walker import register
from ._common import flatten_operands, unflatten_operands


@register(_compat.stop_gradient_p)
def stop_gradient_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    (operand,) = invals
    # The public function skips integer and key leaves, as JAX does for arrays.
    return [jtu.tree_map(jax.lax.stop_gradient, operand)]


@register(_compat.name_p, _compat.copy_p)
def name_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    prim, params = eqn.primitive, eqn.params
    (operand,) = invals
    return [jtu.tree_map(lambda leaf: prim.bind(leaf, **params), operand)]


@register(_compat.optimization_barrier_p)
def barrier_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    leaves, spec = flatten_operands(invals)
    return unflatten_operands(eqn.primitive.bind(*leaves, **eqn.params), spec)
