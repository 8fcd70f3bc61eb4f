"""The jaxpr walker: evaluate a jaxpr whose inputs may be values.

Each equation with no value operand is bound unchanged (the fast path); a higher-order
primitive goes to its handler in `quax/handlers/` (found in `HIGHER_ORDER`, keyed by the
Primitive object); anything else goes through the dispatch protocol of `_dispatch`.
Like `jax.core.eval_jaxpr`, every equation runs inside its own source info, name stack
and context manager, strictly in order, and dead variables are freed after last use.
"""

import contextlib
import struct
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core as jexc
import jax.extend.source_info_util as source_info_util
import numpy as np

from . import _compat
from ._dispatch import (
    check_results,
    handler_operands,
    materialise_all,
    try_defaults,
    try_handlers,
)
from ._errors import site
from ._strict import STATE
from ._values import Value


HigherOrderHandler = Callable[[Any, list[Any]], list[Any]]

#: Higher-order primitives, keyed by Primitive object: their handler recurses into the
#: sub-jaxprs with `walk`. Filled by the modules of `quax/handlers/` as they import.
HIGHER_ORDER: dict[jexc.Primitive, HigherOrderHandler] = {}


def register(*prims: jexc.Primitive | None) -> Callable[[HigherOrderHandler], Any]:
    """Decorator: `fn(eqn, invals) -> outvals` handles `prims` when a value reaches
    them. `None` entries (primitives missing from this JAX version) are skipped."""

    def decorator(fn: HigherOrderHandler) -> HigherOrderHandler:
        for prim in prims:
            if prim is not None:
                HIGHER_ORDER[prim] = fn
        return fn

    return decorator


#: Higher-order primitives told apart by their equation rather than by object (each
#: library makes its own equinox filter primitives): `(matches, handler)` pairs, asked
#: in order when `HIGHER_ORDER` has no entry.
HIGHER_ORDER_MATCHERS: list[tuple[Callable[[Any], bool], HigherOrderHandler]] = []


def register_matcher(
    matches: Callable[[Any], bool],
) -> Callable[[HigherOrderHandler], Any]:
    """Decorator: `fn(eqn, invals) -> outvals` handles every equation for which
    `matches(eqn)` holds, when a value reaches it."""

    def decorator(fn: HigherOrderHandler) -> HigherOrderHandler:
        HIGHER_ORDER_MATCHERS.append((matches, fn))
        return fn

    return decorator


def higher_order_handler(eqn: Any) -> HigherOrderHandler | None:
    """quax's own handler for the higher-order equation `eqn`, or None."""
    handler = HIGHER_ORDER.get(eqn.primitive)
    if handler is None:
        for matches, fn in HIGHER_ORDER_MATCHERS:
            if matches(eqn):
                return fn
    return handler


_ACTIVE = threading.local()


@contextlib.contextmanager
def eqn_context(eqn: Any) -> Iterator[None]:
    """The user's line, name stack and context of `eqn`, as `eval_jaxpr` sets them.

    Re-entering the context of the innermost active equation is a no-op: a handler
    that runs inside `run_eqn`'s context and then `bind`s must not push the
    equation's name stack twice (`foo/foo`).
    """
    stack = _ACTIVE.__dict__.setdefault("eqns", [])
    if stack and stack[-1] is eqn:
        yield
        return
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    stack.append(eqn)
    try:
        with (
            source_info_util.user_context(
                eqn.source_info.traceback, name_stack=name_stack
            ),
            eqn.ctx.manager,
        ):
            yield
    finally:
        stack.pop()


def bind(eqn: Any, invals: Sequence[Any], params: dict[str, Any] | None = None) -> list:
    """Bind `eqn`'s primitive on `invals` as `eval_jaxpr` would; always a list."""
    prim = eqn.primitive
    bind_params: dict[str, Any] = (
        prim.get_bind_params(eqn.params) if params is None else params
    )
    with eqn_context(eqn):  # a no-op when already inside it (handlers)
        out = prim.bind(*invals, **bind_params)
    return list(out) if prim.multiple_results else [out]


def run_eqn(eqn: Any, invals: list[Any]) -> list[Any]:
    """Run one equation with at least one value operand (dispatch protocol)."""
    recorder = STATE.recorder
    if recorder is None:
        return dispatch_eqn(eqn, invals)[1]
    with recorder.equation(eqn, invals) as took:  # `quax.explain` is running
        where, outvals = dispatch_eqn(eqn, invals)
        took(where)
    return outvals


def dispatch_eqn(eqn: Any, invals: list[Any]) -> tuple[str, list[Any]]:
    """`run_eqn`, also saying what took the equation: `"Cls.method"`,
    `"Cls.default"`, `"built-in"` (a higher-order handler of quax) or
    `"materialised"`."""
    prim = eqn.primitive
    with site(eqn.source_info), eqn_context(eqn):
        operands = handler_operands(eqn, invals)
        found = try_handlers(eqn, operands, eqn.params)
        if found is NotImplemented:
            higher_order = higher_order_handler(eqn)
            if higher_order is not None:
                return "built-in", higher_order(eqn, invals)
        if found is NotImplemented:
            bind_params = prim.get_bind_params(eqn.params)
            found = try_defaults(eqn, operands, bind_params)
        if found is NotImplemented:
            return "materialised", bind(eqn, materialise_all(eqn, invals))
        where, result = found
        return where, check_results(eqn, where, result)


def walk(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate the (open) `jaxpr` on `consts` and `args`, any of which may be values."""
    env: dict[Any, Any] = {}
    literal, value = jexc.Literal, Value  # locals: this loop is the hot path
    # The name stack is the same before every equation (each one's context is left
    # before the next), so it is read once.
    base_names = source_info_util.current_name_stack()
    if STATE.recorder is not None:  # once per walk, never per equation
        STATE.recorder.walking(jaxpr)
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    # Inside a `jit`/`make_jaxpr` trace, an equation no value reaches is copied into
    # the trace rather than bound again (`_compat.copy_into_trace`).
    stage = _compat.staging_trace()
    copy_into_trace = _compat.copy_into_trace
    for ctx, run in _plan(jaxpr):
        # One entry of the equations' shared context (`ctx.manager`) per run of
        # equations that carry the same one: the same as entering it per equation.
        with ctx.manager:
            for eqn, dead, foldable, copyable in run:
                invals = [v.val if type(v) is literal else env[v] for v in eqn.invars]
                for x in invals:
                    if isinstance(x, value):
                        outvals = run_eqn(eqn, invals)
                        break
                else:
                    # No value operand: copy the equation, or bind it as
                    # `eval_jaxpr` does (`bind`, inlined).
                    info = eqn.source_info
                    names = info.name_stack
                    folds = (
                        foldable
                        and type(invals[0]) not in _NOT_LITERAL
                        and _is_scalar_literal(invals[0])
                    )
                    outvals = None
                    if copyable and stage is not None and not folds:
                        if len(base_names):
                            info = info.replace(name_stack=base_names + names)
                        outvals = copy_into_trace(stage, eqn, invals, info)
                    if outvals is None:
                        outvals = _bind_plain(eqn, invals, base_names, folds)
                for var, val in zip(eqn.outvars, outvals, strict=True):
                    env[var] = val  # a DropVar key is never read; it goes with `env`
                for var in dead:
                    del env[var]
    return [v.val if type(v) is literal else env[v] for v in jaxpr.outvars]


def _bind_plain(eqn: Any, invals: list[Any], base_names: Any, folds: bool) -> Any:
    """Bind an equation with no value operand, in its source info and name stack;
    `folds`: compute it now (a pure unary primitive on a scalar literal)."""
    prim = eqn.primitive
    info = eqn.source_info
    names = info.name_stack
    params = prim.get_bind_params(eqn.params)
    with source_info_util.user_context(
        info.traceback, name_stack=base_names + names if len(names) else base_names
    ):
        if folds:
            with jax.ensure_compile_time_eval():
                out = prim.bind(*invals, **params)
        else:
            out = prim.bind(*invals, **params)
    return out if prim.multiple_results else (out,)


#: Types that are never literals, learnt as they are seen (tracer classes first): a
#: set lookup on the hot path instead of isinstance checks against ABCs.
_NOT_LITERAL: set[type] = set()


def _is_scalar_literal(x: Any) -> bool:
    """A numpy or Python scalar (a literal's value), never a JAX array or tracer."""
    if isinstance(x, jax.core.Tracer | jax.Array):
        _NOT_LITERAL.add(type(x))
        return False
    return isinstance(x, np.ndarray | np.generic | int | float | complex) and (
        np.ndim(x) == 0
    )


def walk_closed(closed_jaxpr: Any, args: Sequence[Any]) -> list[Any]:
    """`walk` on a ClosedJaxpr."""
    return walk(closed_jaxpr.jaxpr, closed_jaxpr.consts, args)


#: Unary primitives computed while tracing when their operand is a scalar literal: pure
#: functions of that operand alone. Never a collective (`pvary 2.0` and `psum 1` depend
#: on the axes of an enclosing `shard_map`), a random or a higher-order primitive.
_FOLDABLE = frozenset(
    "convert_element_type broadcast_in_dim reshape squeeze expand_dims copy neg sign "
    "abs exp exp2 log log1p expm1 sqrt rsqrt cbrt sin cos tan asin acos atan sinh "
    "cosh tanh asinh acosh atanh logistic floor ceil round not integer_pow "
    "is_finite real imag conj square reduce_precision".split()
)

_Run = list[tuple[Any, tuple[Any, ...], bool, bool]]
_PLANS: "weakref.WeakKeyDictionary[Any, list[tuple[Any, _Run]]]" = (
    weakref.WeakKeyDictionary()
)
_PLANS_LOCK = threading.Lock()


def _plan(jaxpr: Any) -> list[tuple[Any, _Run]]:
    """The equations in runs that share one context object, each equation with the
    variables last read there (freed after it runs, as `eval_jaxpr` does; never the
    jaxpr's outputs). Computed once per jaxpr."""
    try:
        return _PLANS[jaxpr]
    except KeyError:
        pass
    last: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jexc.Literal):
                last[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jexc.Literal):
            last.pop(v, None)
    dead: list[list[Any]] = [[] for _ in jaxpr.eqns]
    for v, i in last.items():
        dead[i].append(v)
    plan: list[tuple[Any, _Run]] = []
    for eqn, d in zip(jaxpr.eqns, dead, strict=True):
        if not plan or plan[-1][0] is not eqn.ctx:
            plan.append((eqn.ctx, []))
        # A unary, effect-free, first-order equation on a scalar literal is computed
        # while tracing (`convert_element_type 0`), so handlers downstream see the
        # value: `jnp.pad(zero, 1)` stays a Zero.
        foldable = (
            len(eqn.invars) == 1 and not eqn.effects and eqn.primitive.name in _FOLDABLE
        )
        copyable = _compat.copyable(eqn)
        plan[-1][1].append((eqn, tuple(d), foldable, copyable))
    with _PLANS_LOCK:  # a WeakKeyDictionary is not safe to write from two threads
        _PLANS[jaxpr] = plan
    return plan


# -- cache keys -------------------------------------------------------------------------
# A cache key must tell apart everything that can change the traced program. `==`
# merges things a program can see: `0.0 == -0.0`, `1 == 1.0 == True`, and a NaN is
# never equal to itself (so it would never hit). Keys are built from each object's
# type and, for numbers, its bit pattern.


def static_key(x: Any) -> Any:
    """A hashable key for a static Python object: equal only when `x` and the other
    object are interchangeable in a program (same type; same bits for floats, so
    signed zeros and NaN payloads differ; recursively for tuples, lists and dicts)."""
    t = type(x)
    if t is int or t is bool or t is str or x is None:
        return (t, x)
    if isinstance(x, float):
        return (t, struct.pack("<d", x))
    if isinstance(x, complex):
        return (t, struct.pack("<dd", x.real, x.imag))
    if t is tuple or t is list:
        return (t, tuple(static_key(e) for e in x))
    if t is dict:
        return (t, tuple((static_key(k), static_key(v)) for k, v in x.items()))
    if isinstance(x, np.ndarray | np.generic):
        return (t, x.dtype, x.shape, np.ascontiguousarray(x).tobytes())
    return (t, x)


def treedef_key(treedef: Any) -> Any:
    """A key for a pytree structure that also tells apart its static data by
    `static_key` (a treedef's own `==` compares static fields with `==`)."""
    node = treedef.node_data()
    if node is None:
        return None  # a leaf
    node_type, aux = node
    return (
        node_type,
        static_key(aux),
        tuple(treedef_key(c) for c in treedef.children()),
    )


def aval_key(aval: Any) -> Any:
    """Shape, dtype and weak type of an aval (tokens and other avals: the aval)."""
    if not hasattr(aval, "shape"):
        return aval
    return (aval.shape, aval.dtype, getattr(aval, "weak_type", False))


def operands_key(leaves: Sequence[Any], spec: Any) -> Any:
    """The key of flattened operands (`handlers._common.flatten_operands`): each
    value's structure by `treedef_key` and every leaf's aval."""
    spec_key = tuple(None if s is None else (treedef_key(s[0]), s[1]) for s in spec)
    return (spec_key, tuple(aval_key(jax.typeof(x)) for x in leaves))


# -- tracing, with its cache ------------------------------------------------------------


class TraceCache:
    """A bounded LRU map from a trace key to `(closed_jaxpr, extra)`, safe to use
    from several threads at once.

    A key must determine the traced program completely (static parts by
    `static_key`, tree structures by `treedef_key`, avals with weak types). `put`
    refuses entries whose constants are tracers, so a cached jaxpr never carries the
    tracers of another trace.
    """

    def __init__(self, maxsize: int = 1024, *, allow_array_consts: bool = False):
        self.maxsize = maxsize
        self.allow_array_consts = allow_array_consts
        self._entries: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, *, probe: bool = False) -> Any:
        """The entry for `key`, or None. `probe`: a miss is not counted (the caller
        will look again, through the path that fills the entry)."""
        if key is None:
            return None
        with self._lock:
            try:
                entry = self._entries.pop(key)
            except (KeyError, TypeError):
                if not probe:
                    self.misses += 1
                return None
            self._entries[key] = entry  # most recently used goes last
            self.hits += 1
            return entry

    def put(self, key: Any, closed_jaxpr: Any, extra: Any) -> bool:
        """Store an entry; False if it may not be cached."""
        if key is None or not consts_are_cacheable(
            closed_jaxpr.consts, self.allow_array_consts
        ):
            return False
        with self._lock:
            try:
                self._entries[key] = (closed_jaxpr, extra)
            except TypeError:  # an unhashable static part: never cached
                return False
            while len(self._entries) > self.maxsize:
                self._entries.pop(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


def consts_are_cacheable(consts: Sequence[Any], allow_arrays: bool = False) -> bool:
    """Tracers belong to one trace and are never baked into a reused jaxpr. Concrete
    JAX arrays are allowed only where the key pins them (`allow_arrays`): a closed-over
    array may be one the user changes between calls."""
    bad = jax.core.Tracer if allow_arrays else jax.Array
    return not any(isinstance(c, bad) for c in consts)
