"""Handlers of higher-order primitives, one module per family.

- `_jit`: `jit` (nested `jax.jit`, and most `jax.numpy` functions).
- `_custom_derivatives`: `custom_jvp_call`, `custom_vjp_call`.
- `_equinox`: equinox's filter primitives (lineax's `linear_solve`).
- `_cond`: `cond` (`lax.cond`, `lax.switch`).
- `_loops`: `while` (`lax.while_loop`, `fori_loop`), `scan` (`lax.scan`, `lax.map`).
- `_checkpoint`: `remat2` (`jax.checkpoint`), `closed_call`, `call`.
- `_callbacks`: `pure_callback`, `io_callback`, `debug_callback`, `debug_print`.
- `_sharding`: `device_put`, `sharding_constraint`, `shard_map` (`jax.pmap`).
- `_structural`: `stop_gradient`, `optimization_barrier`, `name` (`checkpoint_name`).

Each module registers itself into `quax._walker.HIGHER_ORDER` when imported.
"""

from . import (
    _callbacks as _callbacks,
    _checkpoint as _checkpoint,
    _cond as _cond,
    _custom_derivatives as _custom_derivatives,
    _equinox as _equinox,
    _jit as _jit,
    _loops as _loops,
    _sharding as _sharding,
    _structural as _structural,
)
