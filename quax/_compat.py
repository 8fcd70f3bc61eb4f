"""Every JAX-version gate and every private JAX import, in one place.

Each entry says which JAX version changed what, so the next upgrade is one file to read.
"""

import jax
import numpy as np
import jax.extend.core as jexc

# JAX 0.11.0 dropped Python 3.11 and merged `ClosedJaxpr` into `Jaxpr`;
# see ../shared/JAX_NOTES.md section 6.
JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
JAX_GE_0_11 = JAX_VERSION >= (0, 11, 0)

# -- primitives -------------------------------------------------------------------
# Keyed by object, never by name: `pjit` became `jit` in JAX 0.7, and on JAX main after
# 0.11.0 `closed_call_p` is an alias of `eval_jaxpr_p` (name "eval_jaxpr").
_prims = jexc.primitives
jit_p = _prims.jit_p
custom_jvp_call_p = _prims.custom_jvp_call_p
custom_vjp_call_p = _prims.custom_vjp_call_p
cond_p = _prims.cond_p
while_p = _prims.while_p
scan_p = _prims.scan_p
remat_p = _prims.remat_p
closed_call_p = _prims.closed_call_p
call_p = _prims.call_p
name_p = _prims.name_p
stop_gradient_p = getattr(_prims, "stop_gradient_p", None)


def weak_scalar_like(value, dtype, weak_type: bool):
    """A JAX array of `value` with `dtype` and the given weak type.

    Literals in a jaxpr (`2.0:f32[]`) are weakly typed numpy values; handlers must see
    them as JAX arrays of the same dtype *and* weak type, so that `x * 2.0` promotes
    the same way inside a handler as it did in the user's program. JAX has no public
    way to make a weakly typed array of a given dtype (JAX 0.10.2).
    """
    from jax._src.lax.lax import _convert_element_type  # private; see docstring

    return _convert_element_type(value, np.dtype(dtype), weak_type=weak_type)
