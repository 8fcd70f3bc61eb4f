"""Handlers of higher-order primitives, one module per family.

- `_jit`: `jit` (nested `jax.jit`, and most `jax.numpy` functions).
- `_custom_derivatives`: `custom_jvp_call`, `custom_vjp_call`.

Each module registers itself into `quax._walker.HIGHER_ORDER` when imported.
"""

from . import _custom_derivatives as _custom_derivatives, _jit as _jit
