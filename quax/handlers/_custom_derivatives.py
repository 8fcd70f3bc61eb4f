"""`custom_jvp_call` and `custom_vjp_call`: custom derivative rules survive quaxify.

The primal is the inner jaxpr walked on the values, so handlers run there as anywhere
else, and its outputs are materialised. The derivative is the original rule applied to
dense operands: the tangent (or cotangent) of a value is pushed through its
`materialise()` with `jax.jvp` (`jax.vjp`), never taken from its leaves' tangents, which
is only right when `materialise` is linear in the leaves (LoRA's `w + a @ b` is not).
"""

from typing import Any

import jax

from .. import _compat
from .._walker import bind, eqn_context, register, walk_closed
from ._common import dense_all, flatten_operands, unflatten_operands


def _split(eqn: Any, invals: list[Any]) -> tuple[list[Any], Any, Any]:
    """The operands' leaves; the walked primal on leaves (outputs materialised); and
    the dense operands as a function of the leaves (to push tangents through)."""
    leaves, spec = flatten_operands(invals)
    call_jaxpr = eqn.params["call_jaxpr"]

    def walked(*leaves):
        return dense_all(walk_closed(call_jaxpr, unflatten_operands(leaves, spec)), eqn)

    def dense_operands(*leaves):
        return dense_all(unflatten_operands(leaves, spec), eqn)

    return leaves, walked, dense_operands


@register(_compat.custom_jvp_call_p)
def custom_jvp_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    leaves, walked, dense_operands = _split(eqn, invals)
    primal = jax.custom_jvp(walked)

    @primal.defjvp
    def primal_jvp(primals, tangents):
        xs, x_dots = jax.jvp(dense_operands, primals, tangents)
        return jax.jvp(lambda *xs: bind(eqn, xs), xs, x_dots)

    with eqn_context(eqn):
        return primal(*leaves)


@register(_compat.custom_vjp_call_p)
def custom_vjp_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    leaves, walked, dense_operands = _split(eqn, invals)
    primal = jax.custom_vjp(walked)

    def fwd(*leaves):
        xs, pull_leaves = jax.vjp(dense_operands, *leaves)
        outs, pull_xs = jax.vjp(lambda *xs: bind(eqn, xs), *xs)
        return outs, (pull_xs, pull_leaves)

    def bwd(residuals, out_cts):
        pull_xs, pull_leaves = residuals
        x_cts = pull_xs(list(out_cts))
        return pull_leaves(list(x_cts))

    primal.defvjp(fwd, bwd)
    with eqn_context(eqn):
        return primal(*leaves)
