"""Every JAX-version gate and every private JAX import, in one place.

Each entry says which JAX version changed what, so the next upgrade is one file to read.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core as jexc
import jax.extend.linear_util as jexc_lu
import numpy as np


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
# May be aliases of one `eval_jaxpr_p` after JAX 0.11.0, or gone: None is skipped.
closed_call_p = getattr(_prims, "closed_call_p", None)
call_p = getattr(_prims, "call_p", None)
name_p = getattr(_prims, "name_p", None)
stop_gradient_p = getattr(_prims, "stop_gradient_p", None)
copy_p = getattr(_prims, "copy_p", None)


def weak_scalar_like(value, dtype, weak_type: bool):
    """A JAX array of `value` with `dtype` and the given weak type.

    Literals in a jaxpr (`2.0:f32[]`) are weakly typed numpy values; handlers must see
    them as JAX arrays of the same dtype *and* weak type, so that `x * 2.0` promotes
    the same way inside a handler as it did in the user's program. JAX has no public
    way to make a weakly typed array of a given dtype (JAX 0.10.2).
    """
    from jax._src.lax.lax import _convert_element_type  # private; see docstring

    return _convert_element_type(value, np.dtype(dtype), weak_type=weak_type)


# -- higher-order and structural primitives (quax/handlers/) -------------------------
optimization_barrier_p = getattr(jax.lax, "optimization_barrier_p", None)
linear_solve_p = getattr(_prims, "linear_solve_p", None)


def _private_primitive(module: str, name: str) -> Any:
    """A primitive JAX does not export (JAX 0.10.2: the callback primitives live in
    `jax._src.callback` and `jax._src.debugging`). None where it moved or vanished:
    the handler is then skipped and the default path (materialise, then bind) runs."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


pure_callback_p = _private_primitive("jax._src.callback", "pure_callback_p")
io_callback_p = _private_primitive("jax._src.callback", "io_callback_p")
debug_callback_p = _private_primitive("jax._src.debugging", "debug_callback_p")
debug_print_p = _private_primitive("jax._src.debugging", "debug_print_p")
# `jax.shard_map` (and `jax.pmap`, built on it since JAX 0.10) binds a primitive that
# `jax.extend` does not export (JAX 0.10.2, 0.11.2).
shard_map_p = _private_primitive("jax._src.shard_map", "shard_map_p")
device_put_p = getattr(_prims, "device_put_p", None)
sharding_constraint_p = getattr(_prims, "sharding_constraint_p", None)


def scan_split(params: dict[str, Any], n_operands: int) -> tuple[int, int]:
    """How many of a `scan` equation's operands are consts and carries.

    JAX 0.11.0 replaced `num_consts`/`num_carry` with `ft_in`, a private
    `jax._src.flattree.FlatTree` over `(consts, carry, xs)`; its `update(...).unpack()`
    splits the operands the way scan's own impl does.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].update(list(range(n_operands))).unpack()
    return len(list(consts)), len(list(carry))


def convert_constvars_jaxpr(jaxpr: Any) -> Any:
    """The open jaxpr taking `jaxpr.constvars` as leading invars (`remat2`'s jaxpr
    param is open). No public API does this in JAX 0.10.2 or 0.11.0."""
    from jax._src.interpreters.partial_eval import convert_constvars_jaxpr as convert

    return convert(jaxpr)


def trace_flat(
    fn: Callable[..., Any], specs: Sequence[Any], name: str, *, named_args: bool = True
) -> tuple[Any, list[Any]]:
    """`fn` (leaves in, a pytree of leaves out) traced on the avals `specs` to an open
    jaxpr and the constants it closed over, as `lax.scan` and `lax.while_loop` trace
    their bodies. `jax.make_jaxpr` does the same through `jax.jit`'s machinery, which
    costs about as much again on a small body; it is the fallback where JAX's private
    tracing entry point (`partial_eval.trace_to_jaxpr_dynamic`, stable from 0.4 to
    0.10.2) is not there. `specs` may be avals already; `named_args=False` skips
    reading `fn`'s signature for its argument names (half the cost of tracing a
    one-equation function)."""
    if _TRACE_DYNAMIC is None:
        closed = jax.make_jaxpr(fn)(*specs)
        return closed.jaxpr, list(closed.consts)
    trace_dynamic, debug_info = _TRACE_DYNAMIC
    shaped = jax.core.ShapedArray
    avals = [
        s
        if type(s) is shaped
        else shaped(s.shape, s.dtype, weak_type=getattr(s, "weak_type", False))
        for s in specs
    ]
    if named_args:
        dbg = debug_info(name, fn, tuple(specs), {})
    else:
        dbg = jexc.DebugInfo(name, name, None, None)

    def flat(*args: Any) -> list[Any]:  # outputs flattened, as `make_jaxpr` does
        return jax.tree_util.tree_leaves(fn(*args))

    jaxpr, _, consts = trace_dynamic(jexc_lu.wrap_init(flat, debug_info=dbg), avals)
    consts = list(consts)
    if len(jaxpr.constvars) != len(consts):
        # JAX 0.11 (`Jaxpr` and `ClosedJaxpr` merged): the constvars of a jaxpr with
        # no values attached are its leading invars; attach them, as in 0.10.
        jaxpr = jaxpr.with_consts(consts)
    return jaxpr, consts


def _find_trace_dynamic() -> Any:
    try:
        from jax._src.api_util import debug_info  # private; see `trace_flat`
        from jax._src.interpreters.partial_eval import (  # private; see `trace_flat`
            trace_to_jaxpr_dynamic,
        )
    except ImportError:
        return None
    return trace_to_jaxpr_dynamic, debug_info


_TRACE_DYNAMIC = _find_trace_dynamic()


def varying_axes(aval: Any) -> frozenset[Any]:
    """The manual mesh axes an aval varies over inside `shard_map` (JAX 0.10.2 keeps
    them in `aval.mat.varying`, printed `{V:...}`; earlier JAX in `aval.vma`)."""
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def jit_disabled() -> bool:
    """Whether `jax.disable_jit()` is active (a config option with no typed accessor)."""
    return bool(jax.config.jax_disable_jit)  # pyright: ignore[reportAttributeAccessIssue]


def is_eager() -> bool:
    """Whether no JAX transformation or trace is active (JAX 0.10.2 has no public
    predicate; `jax.extend.core.unsafe_am_i_under_a_jit_DO_NOT_USE` misses vmap/grad)."""
    from jax._src import core  # private; see docstring

    return isinstance(core.trace_ctx.trace, core.EvalTrace)


def trace_context() -> Any:
    """The configuration that can change what tracing produces (x64, rank promotion,
    default matmul precision, ...), as a hashable tuple: what `jax.jit` puts in its own
    cache keys. No public accessor in JAX 0.10.2."""
    from jax._src import config  # private; see docstring

    return config.trace_context()


def is_unspecified_sharding(sharding: Any) -> bool:
    """Whether a `jit` equation's in/out sharding entry is JAX's "unspecified"
    placeholder (JAX 0.10.2: `jax._src.named_sharding.UnspecifiedValue`, not public)."""
    from jax._src.named_sharding import UnspecifiedValue  # private; see docstring

    return isinstance(sharding, UnspecifiedValue)


# -- copying equations into a trace (quax/_walker.py) --------------------------------
# The walker's fast path: an equation no value reaches is copied into the current
# `jit`/`make_jaxpr` trace (new variables, the same primitive, params, effects, source
# info and context) instead of being bound again, which skips abstract evaluation and
# the bind machinery (about 3x cheaper per equation). JAX has no public API to add an
# equation to a trace in progress: this uses `DynamicJaxprTrace`'s frame, tracer and
# `TracingEqn` (JAX 0.10.2). `copy_into_trace` checks itself once against `bind` and
# turns itself off if the internals differ (another JAX version): the walker then binds.

_COPY_OK: bool | None = None
_staging_rules: Any = None
try:  # private; see the section comment
    from jax._src import core as _core
    from jax._src.interpreters import partial_eval as _pe

    _trace_ctx = _core.trace_ctx
    _StagingTrace = _pe.DynamicJaxprTrace
    _StagingTracer = _pe.DynamicJaxprTracer
    _TracingEqn = _pe.TracingEqn
    _staging_rules = _pe.custom_staging_rules
    _Ref = _core.Ref
except (ImportError, AttributeError):  # another JAX: the walker binds
    _COPY_OK = False


def in_staging_trace() -> bool:
    """Whether the current trace stages a jaxpr (inside `jax.jit`, `make_jaxpr`, a
    control-flow body). False where JAX's trace classes are not found."""
    return _staging_rules is not None and type(_trace_ctx.trace) is _StagingTrace


def staging_trace() -> Any:
    """The current trace if it stages a jaxpr (inside `jax.jit`, `make_jaxpr`, a
    control-flow body), else None. None too where copying is not available."""
    if _COPY_OK is False:
        return None
    trace = _trace_ctx.trace
    if type(trace) is not _StagingTrace:
        return None
    if _COPY_OK is None and not _check_copy():
        return None
    return trace


#: Primitives whose staging rule (JAX 0.10.2) only calls the default one.
_DEFAULT_STAGING = frozenset(("broadcast_in_dim", "reshape", "iota", "dynamic_slice"))


def current_trace() -> Any:
    """The innermost active trace (JAX 0.10.2: no public accessor)."""
    from jax._src import core  # private; see docstring

    return core.trace_ctx.trace


def release_trace(trace: Any) -> None:
    """Drop what a staging trace stopped by an exception holds (its equations and
    constants), as JAX does for a trace that ends normally (`invalidate`, JAX 0.10.2:
    an exception skips it). Other traces are left alone."""
    if type(trace).__name__ == "DynamicJaxprTrace" and hasattr(trace, "invalidate"):
        trace.invalidate()


def has_input_effects(effects: Any) -> bool:
    """Whether any of `effects` is indexed by a jaxpr input (a mutable reference's
    read or write): such an index would be wrong in a jaxpr with other inputs. JAX
    0.10.2 exports no public name for the class; where it is missing, every effect
    counts, so that the caller plays safe."""
    if not effects:
        return False
    try:
        from jax._src.effects import JaxprInputEffect  # private; see docstring
    except ImportError:
        return True
    return any(isinstance(e, JaxprInputEffect) for e in effects)


def copyable(eqn: Any) -> bool:
    """Whether `eqn` may be copied into a trace rather than bound (`keepable`, where
    copying works)."""
    return _COPY_OK is not False and keepable(eqn)


def keepable_known() -> bool:
    """Whether `keepable` can tell (JAX's staging rules were found)."""
    return _staging_rules is not None


def keepable(eqn: Any) -> bool:
    """Whether `eqn`, met with the same operands, may stand in a new jaxpr as it is:
    no effects (their input indices are resolved at bind time), no staging rule that
    does more than the default one (a nested `jit` is kept unless it is to be inlined
    or holds mutable state), no mutable state. False for all where JAX's staging
    rules are not where JAX 0.10.2 has them."""
    if _staging_rules is None:
        return False
    prim = eqn.primitive
    if eqn.effects or prim.ref_allocating:
        return False
    for v in eqn.outvars:
        if getattr(v.aval, "has_qdd", False):
            return False
    if prim not in _staging_rules or prim.name in _DEFAULT_STAGING:
        return True
    if prim is jit_p:
        params = eqn.params
        return (
            not params.get("inline", False)
            and not params.get("compiler_options_kvs")
            and not any(isinstance(c, _Ref) for c in params["jaxpr"].consts)
        )
    return False


def copy_into_trace(trace: Any, eqn: Any, invals: list[Any], source_info: Any) -> Any:
    """`eqn` added to `trace` on `invals` (tracers of `trace` with the avals of
    `eqn`'s inputs; literals stay literals); its output tracers. None (nothing
    added) when an operand is anything else: the caller binds instead."""
    tracer_type = _StagingTracer
    ins = []
    for var, x in zip(eqn.invars, invals, strict=True):
        if type(var) is jexc.Literal:
            ins.append(tracer_type(trace, var.aval, var, source_info))
        elif type(x) is tracer_type and x._trace is trace:
            if x.aval is not var.aval and x.aval != var.aval:
                return None
            ins.append(x)
        else:
            return None
    frame = trace.frame
    outvars = [frame.newvar(v.aval) for v in eqn.outvars]
    traced = _TracingEqn(
        ins, outvars, eqn.primitive, eqn.params, eqn.effects, source_info, eqn.ctx
    )
    frame.add_eqn(traced)
    return [tracer_type(trace, v.aval, v, source_info, traced) for v in outvars]


def _check_copy() -> bool:
    """Copy a small program both ways once; keep copying only if the results agree."""
    global _COPY_OK
    _COPY_OK = False  # while checking, and for good if anything below fails
    try:
        import jax.numpy as jnp

        def prog(x):
            return jnp.sin(x) * 2.0 + 1

        closed = jax.make_jaxpr(prog)(np.float32(1.0))

        def copied(x):
            trace = _trace_ctx.trace
            env = {closed.jaxpr.invars[0]: x}
            for eqn in closed.jaxpr.eqns:
                invals = [
                    v.val if type(v) is jexc.Literal else env[v] for v in eqn.invars
                ]
                outs = copy_into_trace(trace, eqn, invals, eqn.source_info)
                assert outs is not None
                env.update(zip(eqn.outvars, outs, strict=True))
            return env[closed.jaxpr.outvars[0]]

        got = jax.make_jaxpr(copied)(np.float32(1.0))
        with jax.ensure_compile_time_eval():  # the check may run inside a trace
            same = jax.jit(copied)(np.float32(0.5)) == prog(np.float32(0.5))
        ok = str(got.jaxpr) == str(closed.jaxpr) and bool(same)
    except Exception:  # any other JAX: bind instead, as before
        ok = False
    _COPY_OK = ok
    return ok
