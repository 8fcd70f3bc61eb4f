"""`pure_callback`, `io_callback`, `debug_callback` (`jax.debug.callback`) and
`debug_print` (`jax.debug.print`): values are materialised before they leave JAX.

A callback's Python function expects arrays, so every value operand is materialised
and the primitive is bound as usual, keeping its effects and their order. A class that
wants otherwise defines a handler method named after the primitive; unlike other
first-order primitives, a class's `default` is not asked here.
"""

from typing import Any

from .. import _compat
from .._dispatch import materialise_all
from .._walker import register


@register(
    _compat.pure_callback_p,
    _compat.io_callback_p,
    _compat.debug_callback_p,
    _compat.debug_print_p,
)
def callback_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    prim = eqn.primitive
    # Runs inside the context `run_eqn` set for `eqn`.
    out = prim.bind(*materialise_all(eqn, invals), **prim.get_bind_params(eqn.params))
    return list(out) if prim.multiple_results else [out]
