"""`quaxify`: partition the inputs, trace to a jaxpr, walk it, rebuild the outputs."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import jax.tree_util as jtu
import numpy as np

from . import _compat
from ._closures import lift_closure
from ._errors import _MSG_NOT_CALLABLE, QuaxifyTypeError
from ._flat import Flat, fn_flat, is_array, operands
from ._rewrite import rewrite
from ._strict import STATE, Mode, check_mode, mode_for_call
from ._values import aval_of, is_value
from ._walker import TraceCache, static_key, treedef_key, walk_closed
from .handlers._common import unflatten_operands
from .handlers._jit import jit_params


#: Traces of quaxified functions, shared by every `quaxify` wrapper.
TRACES = TraceCache()

_CONCRETE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.NonConcreteBooleanIndexError,
)


class _Quaxify(eqx.Module):
    fn: Callable[..., Any]
    filter_spec: Any = eqx.field(static=True)
    cache: bool = eqx.field(static=True, default=True)
    materialise: str | None = eqx.field(static=True, default=None)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.fn

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        return eqx.Partial(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.filter_spec is True:
            # `(fn, args, kwargs)` flattened in two parts: `fn`'s (a model: most of the
            # leaves) is remembered per model object (see `fn_flat`).
            flat = fn_flat(self.fn).join(Flat.of((args, kwargs)))
            passthrough = None
        else:
            # Values captured by a closure, bound method or partial become inputs.
            tree = (lift_closure(self.fn), args, kwargs)
            dynamic, passthrough = eqx.partition(
                tree, self.filter_spec, is_leaf=is_value
            )
            flat = Flat.of(dynamic)
        if not any(is_value(flat.leaves[i]) for i in flat.positions):
            return self.fn(*args, **kwargs)  # nothing to dispatch on: the original
        with mode_for_call(self.materialise):
            return _call(flat, passthrough, self.cache, self.fn)


def _call(flat: Flat, passthrough: Any, cache: bool, fn: Any) -> Any:
    leaves, positions = flat.leaves, flat.positions
    inputs = [leaves[i] for i in positions]
    recorder = STATE.recorder  # `quax.explain`: walk op by op, see every equation
    key = None
    if cache:
        key = _trace_key(flat, passthrough)
        # The walk (compiled and cached with the trace) depends on the strict mode.
        key = None if key is None else (key, STATE.mode)
    entry = TRACES.get(key)
    cached = entry is not None
    if entry is None:
        entry, cacheable = _trace(flat, passthrough, inputs)
        cached = cacheable and TRACES.put(key, *entry)
    closed_jaxpr, meta = entry
    outvals = None
    if recorder is None:
        if cached:
            outvals = _run_compiled(closed_jaxpr, meta, flat)
        if outvals is None:
            outvals = _run_rewritten(closed_jaxpr, meta, flat, inputs, fn, cached)
    if outvals is None:
        outvals = walk_closed(closed_jaxpr, [inputs[k] for k in meta.keep])
    out_leaves = list(meta.out_leaves)
    for i, val in zip(meta.out_positions, outvals, strict=True):
        out_leaves[i] = _as_output(val)
    return jtu.tree_unflatten(meta.out_treedef, out_leaves)


class _Meta:
    """What a trace needs besides its jaxpr: which dynamic inputs it takes, how to
    rebuild the outputs, and (eager calls) the compiled walk."""

    def __init__(self, keep, out_treedef, out_leaves, out_positions):
        self.keep = keep
        self.out_treedef = out_treedef
        self.out_leaves = out_leaves
        self.out_positions = out_positions
        # None: not compiled yet; False: needs op-by-op (a handler needs concrete
        # values); else the `jax.jit` of the walk.
        self.compiled: Any = None
        # None: not rewritten yet; False: walk every time; else the walked program
        # as a jaxpr over the inputs' leaves, how to rebuild its outputs, and the
        # params of the `jit` equation that calls it.
        self.rewritten: Any = None


def _run_compiled(closed_jaxpr: Any, meta: _Meta, flat: Flat) -> list[Any] | None:
    """Eager calls (every input concrete) run the walked program compiled, cached per
    trace, unless `jax.disable_jit()` is on or a handler needs concrete values; then
    None, and the caller walks op by op. The compiled walk takes the inputs' leaves,
    so that JAX's dispatch sees a flat list of arrays."""
    if meta.compiled is False or _compat.jit_disabled() or not _compat.is_eager():
        return None
    op_leaves, spec, traced = operands(flat)
    if traced:
        return None
    if meta.compiled is None:

        def compiled_walk(op_leaves):
            return walk_closed(closed_jaxpr, unflatten_operands(op_leaves, spec))

        meta.compiled = jax.jit(compiled_walk)
    try:
        return meta.compiled(op_leaves)
    except _CONCRETE_ERRORS:
        meta.compiled = False
        return None


def _run_rewritten(
    closed_jaxpr: Any, meta: _Meta, flat: Flat, fed: list[Any], fn: Any, keep: bool
) -> list[Any] | None:
    """Inside a `jit` or `make_jaxpr` trace, the walked program is a function of the
    trace key alone: rewrite the jaxpr into one over the inputs' leaves
    (`_rewrite.rewrite`; cached with the trace when `keep`) and bind that as one
    `jit` equation, as `jax.jit` does. None elsewhere (eagerly, or under
    `grad`/`vmap`, where handlers may see their operands' tracers) or where the
    rewrite cannot be made, and the caller walks."""
    if meta.rewritten is False or not _compat.in_staging_trace():
        return None
    if len(meta.keep) != len(fed):  # traced with concrete arrays: eager only
        return None
    leaves, spec, _ = operands(flat)
    entry = meta.rewritten
    if entry is None:
        name = getattr(fn, "__name__", type(fn).__name__)
        folded = (False,) * len(fed)
        got = rewrite(closed_jaxpr, fed, folded, leaves, spec, name)
        if got is None:  # see `rewrite`: walk, now and on later traces
            if keep:
                meta.rewritten = False
            return None
        new_closed, out_spec, hoisted = got
        entry = (new_closed, out_spec, jit_params(name, new_closed))
        if keep and not hoisted:
            meta.rewritten = entry
        leaves = hoisted + leaves
    new_closed, out_spec, params = entry
    if not new_closed.jaxpr.eqns:  # nothing to compute: forward, as `jit` would
        out_leaves = jax.core.eval_jaxpr(new_closed.jaxpr, new_closed.consts, *leaves)
    else:
        out_leaves = _compat.jit_p.bind(*leaves, **params)
    return unflatten_operands(out_leaves, out_spec)


def _trace(flat: Flat, passthrough: Any, inputs: list[Any]):
    """Trace with every value and array abstract; if the function needs a concrete
    plain array (eager mode only), trace again with the plain arrays closed over.

    Returns `((closed_jaxpr, meta), cacheable)`; `meta.keep` lists which of the
    dynamic inputs the jaxpr takes.
    """
    specs = [_spec(aval_of(x) if is_value(x) else jax.typeof(x)) for x in inputs]
    positions = flat.positions
    try:
        closed, meta = _make_jaxpr(flat, passthrough, positions, specs)
        return (closed, _Meta(tuple(range(len(positions))), *meta)), True
    except _CONCRETE_ERRORS:
        if any(isinstance(x, jax.core.Tracer) for x in inputs):
            raise
    # Eager retry: plain arrays stay concrete, as in plain JAX. Never cached: the
    # trace depends on their values.
    keep = tuple(k for k, x in enumerate(inputs) if is_value(x))
    with jax.ensure_compile_time_eval():
        closed, meta = _make_jaxpr(
            flat,
            passthrough,
            [positions[k] for k in keep],
            [specs[k] for k in keep],
        )
    return (closed, _Meta(keep, *meta)), False


def _make_jaxpr(flat, passthrough, positions, specs):
    box: list[Any] = []
    treedef = flat.treedef()

    def flat_fn(*dyn):
        new_leaves = list(flat.leaves)
        for i, x in zip(positions, dyn, strict=True):
            new_leaves[i] = x
        tree = jtu.tree_unflatten(treedef, new_leaves)
        if passthrough is not None:
            tree = eqx.combine(tree, passthrough, is_leaf=is_value)
        fn, args, kwargs = tree
        out = fn(*args, **kwargs)
        out_leaves, out_treedef = jtu.tree_flatten(out)
        out_positions = [i for i, x in enumerate(out_leaves) if eqx.is_array(x)]
        static = [None if eqx.is_array(x) else x for x in out_leaves]
        box.append((out_treedef, tuple(static), tuple(out_positions)))
        return [out_leaves[i] for i in out_positions]

    jaxpr, consts = _compat.trace_flat(flat_fn, specs, "quaxify", named_args=False)
    return jexc.ClosedJaxpr(jaxpr, consts), box[0]


def _spec(aval: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _trace_key(flat: Flat, passthrough: Any) -> Any:
    """Everything the traced program depends on, or None if it cannot be keyed: the
    key of the tree's structure and leaves (`_flat_key`), what is passed through
    (never values: those are closed over), and JAX's configuration."""
    if flat.key is None:
        return None
    pass_key = None
    if passthrough is not None:
        pass_leaves, pass_treedef = jtu.tree_flatten(passthrough, is_leaf=is_value)
        if any(is_value(x) or is_array(x) for x in pass_leaves):
            return None  # values passed through are closed over: never reused
        pass_key = (
            treedef_key(pass_treedef),
            tuple(static_key(x) for x in pass_leaves),
        )
    key = (flat.key, pass_key, _compat.trace_context())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _as_output(x: Any) -> Any:
    # Literal outputs and numpy constants come back as JAX arrays, as from plain JAX.
    if isinstance(x, np.ndarray | np.generic):
        return jax.numpy.asarray(x)
    return x


def quaxify(
    fn: Callable[..., Any],
    filter_spec: Any = True,
    *,
    cache: bool = True,
    materialise: Mode | None = None,
) -> Callable[..., Any]:
    """Make `fn` accept array-ish values (`quax.ArrayValue`s) wherever it accepts arrays.

    `fn` is traced to a jaxpr with each value replaced by its `aval()`, and the jaxpr
    is walked: every primitive that touches a value is handed to that value's class
    (see the README's protocol table); everything else runs as plain JAX.

    **Arguments:**

    - `fn`: any callable: a function, a bound method or an equinox Module.
    - `filter_spec`: a prefix of `(fn, args, kwargs)` of bools (or callables returning
      bools), as in `eqx.partition`. Values at `False` positions are passed through to
      `fn` untouched (for a nested `quaxify` to handle).
    - `cache`: whether to reuse the trace of `fn` for later calls with the same
      static arguments and the same shapes, dtypes and structures (the default, as
      `jax.jit` does: Python side effects and global reads of `fn` happen when it is
      traced, not on every call). `False` traces `fn` again on every call.
    - `materialise`: what an implicit materialisation (a value turned into a dense
      array because no handler took a primitive) does during this function's calls:
      `"allow"` it, `"warn"` (`quax.MaterialiseWarning`) or raise
      `quax.MaterialiseError`. None (the default): as set by `quax.strict`, else
      `"allow"`.

    **Returns:**

    A callable (an equinox Module) with the same signature as `fn`, and its
    `__name__`, `__qualname__`, `__doc__`, `__module__` and `__wrapped__` (as
    `functools.wraps`). Values returned by `fn` come back as values of the same
    types. It also works as a method decorator.
    """
    if not callable(fn):
        raise QuaxifyTypeError(_MSG_NOT_CALLABLE.format(got=fn, type=type(fn).__name__))
    if materialise is not None:
        check_mode(materialise, "quaxify's `materialise`")
    return eqx.module_update_wrapper(_Quaxify(fn, filter_spec, cache, materialise))
