"""Inside a trace, quaxify rewrites a jaxpr into a jaxpr.

`rewrite` returns the program that walking a jaxpr on its operands would stage, as a
ClosedJaxpr over the operands' leaves, without tracing what no value reaches:

- an equation whose operands are all plain is kept: the same equation object, or a
  copy that reads renamed variables (`eqn.replace`), with its params, effects, source
  info and context; no tracer is made and nothing is bound;
- a run of equations that a value reaches is traced as a *fragment*: a fresh trace
  over the leaves the run reads, in which the walker's protocol (`run_eqn`) runs each
  equation, the run ending before the first equation with no value operand; the
  fragment's equations are spliced in, and its results (arrays, or values as their
  leaves) are what later equations read.

So the cost of an equation no value reaches is a few dictionary lookups, against a
`bind` for the walker, and handlers run exactly as they do in the walk. A unary
equation on a scalar literal (`convert_element_type 0.0`) is kept, and its result is
also computed, lazily, for the fragments that read it: handlers see the constant, as
in the walk (`jnp.pad(zero, 0.0)` stays a `Zero`).

None (the caller walks instead) where the rewrite cannot keep the walk's meaning: a
jaxpr with mutable references, effects indexed by input, an operand whose type
differs from the jaxpr's.
"""

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core as jexc
import jax.extend.source_info_util as source_info_util
import numpy as np

from . import _compat
from ._strict import STATE
from ._values import Value
from ._walker import _FOLDABLE, _bind_plain, bind, run_eqn


#: The most equations one fragment may run: the fragment's inputs are what these
#: equations read, found before it is traced.
_WINDOW = 64


class Val:
    """A value during the rewrite: its treedef and its leaves as atoms."""

    __slots__ = ("atoms", "treedef")

    def __init__(self, treedef: Any, atoms: list[Any]):
        self.treedef = treedef
        self.atoms = atoms


def read_leaves(reads: Sequence[Any]) -> tuple[list[Any], tuple[Any, ...]]:
    """Operands as the rewrite holds them (atoms, or `Val`s) flattened: the atoms,
    and per operand None or `(treedef, number of atoms)`."""
    atoms = [a for r in reads for a in (r.atoms if type(r) is Val else [r])]
    spec = tuple((r.treedef, len(r.atoms)) if type(r) is Val else None for r in reads)
    return atoms, spec


def as_reads(spec: Sequence[Any], atoms: Any) -> list[Any]:
    """The inverse of `read_leaves`: per entry of `spec`, the next atom of the
    iterator `atoms`, or a `Val` of the next ones."""
    return [
        next(atoms) if s is None else Val(s[0], [next(atoms) for _ in range(s[1])])
        for s in spec
    ]


#: An equation's rewrite without a fragment: given the equation and what each operand
#: now is (an atom, or a `Val`: a value as its treedef and its leaves as atoms),
#: the new equation, what each result is, and the constants (variable, value) the new
#: equation reads; or None, and a fragment runs it.
EqnRewriter = Callable[
    [Any, list[Any]], "tuple[Any, list[Any], list[tuple[Any, Any]]] | None"
]

#: Per primitive (filled by `quax/handlers/`): nested `jit` equations whose walked
#: body is cached are emitted again directly, and `scan`, `while` and `cond` with
#: their bodies and branches rewritten by `rewrite` itself.
EQN_REWRITERS: dict[Any, EqnRewriter] = {}


class _Abort(Exception):
    """The rewrite cannot keep the walk's meaning: the caller walks instead."""


def rewrite(
    closed: Any,
    invals: Sequence[Any],
    folded: Sequence[bool],
    leaves: Sequence[Any],
    spec: Any,
    name: str = "quaxify",
) -> tuple[Any, Any, list[Any]] | None:
    """`closed` on `invals` (values, arrays, tracers; `folded` ones are scalar
    literals folded into the program) as a ClosedJaxpr over `hoisted + leaves`,
    the spec of its outputs, and `hoisted`: the tracers of an enclosing trace that
    `closed` held as constants (the rewritten jaxpr takes them as leading inputs).
    `leaves` are the other operands flattened, `spec` as
    `handlers._common.flatten_operands` gives it. None if it cannot be rewritten
    (see the module)."""
    if STATE.recorder is not None:
        return None  # `quax.explain` walks, to see every equation
    plan = _plan(closed.jaxpr)
    if plan is None:
        return None
    try:
        return _Rewrite(closed, plan, name).run(invals, folded, leaves, spec)
    except _Abort:
        return None


# -- the plan of a jaxpr: computed once -------------------------------------------------

_Plan = tuple[list[tuple[Any, bool, bool]], dict[Any, int]]
_PLANS: "weakref.WeakKeyDictionary[Any, _Plan | None]" = weakref.WeakKeyDictionary()
_PLANS_LOCK = threading.Lock()


def _plan(jaxpr: Any) -> _Plan | None:
    """Per equation: whether it may be kept as it is when no value reaches it
    (`_compat.keepable`: no effects, no staging rule of its own) and whether it is
    foldable; and the index of each variable's last reader (the jaxpr's outputs are
    read after the last equation). None if the jaxpr cannot be rewritten."""
    try:
        return _PLANS[jaxpr]
    except KeyError:
        pass
    if not _compat.keepable_known():
        return None  # another JAX: every equation would be a fragment; walk
    plan: _Plan | None = None
    steps = []
    last: dict[Any, int] = {}
    literal, keepable, foldable_names = jexc.Literal, _compat.keepable, _FOLDABLE
    for i, eqn in enumerate(jaxpr.eqns):
        keep = keepable(eqn)
        if not keep and (
            eqn.primitive.ref_allocating
            or _compat.has_input_effects(eqn.effects)
            or any(getattr(v.aval, "has_qdd", False) for v in eqn.outvars)
        ):
            break  # mutable state: its effects name the jaxpr's inputs
        invars = eqn.invars
        for v in invars:
            if type(v) is not literal:
                last[v] = i
        foldable = keep and len(invars) == 1 and eqn.primitive.name in foldable_names
        steps.append((eqn, keep, foldable))
    else:
        for v in jaxpr.outvars:
            if type(v) is not literal:
                last[v] = len(jaxpr.eqns)
        plan = (steps, last)
    with _PLANS_LOCK:
        _PLANS[jaxpr] = plan
    return plan


# -- the rewrite ------------------------------------------------------------------------


class _Rewrite:
    def __init__(self, closed: Any, plan: _Plan, name: str):
        self.jaxpr = closed.jaxpr
        self.steps, self.last = plan
        self.name = name
        # The atom (renamed variable or literal) or `Val` each variable of `jaxpr`
        # now is; a variable not in `env` is itself.
        self.env: dict[Any, Any] = {}
        # Constants handlers see, as in the walk: the jaxpr's concrete constants,
        # folded operands, and the equations computing a folded constant (run when
        # a fragment first reads it).
        self.known: dict[Any, Any] = {
            v: c
            for v, c in zip(self.jaxpr.constvars, closed.consts, strict=True)
            if not isinstance(c, jax.core.Tracer)
        }
        self.lazy: dict[Any, Any] = {}
        self.eqns: list[Any] = []
        self.constvars = list(self.jaxpr.constvars)
        self.consts = list(closed.consts)
        self.effects: set[Any] = set()

    def run(self, invals, folded, leaves, spec) -> tuple[Any, Any, list[Any]]:
        invars = self._inputs(invals, folded, leaves, spec)
        steps, n, i = self.steps, len(self.steps), 0
        env, literal, val = self.env, jexc.Literal, Val
        while i < n:
            eqn, keep, foldable = steps[i]
            if keep:
                renamed = None
                for k, v in enumerate(eqn.invars):
                    if type(v) is literal:
                        continue
                    e = env.get(v)
                    if e is None:
                        continue
                    if type(e) is val:
                        break
                    if renamed is None:
                        renamed = list(eqn.invars)
                    renamed[k] = e
                else:
                    if renamed is not None:
                        eqn = eqn.replace(invars=renamed)
                    if foldable and type(eqn.invars[0]) is literal:
                        self.lazy[eqn.outvars[0]] = eqn
                    self.eqns.append(eqn)
                    i += 1
                    continue
            spliced = EQN_REWRITERS.get(eqn.primitive)
            if spliced is not None and self._splice(spliced, eqn):
                i += 1
                continue
            i = self._fragment(i)
        outvars, out_spec = self._outputs()
        # Constants that are tracers of an enclosing trace (the function closed
        # over them) become leading inputs: a `jit` equation's jaxpr holds none.
        hoisted = [
            k for k, c in enumerate(self.consts) if isinstance(c, jax.core.Tracer)
        ]
        if hoisted:
            invars = [self.constvars[k] for k in hoisted] + invars
            outer = [self.consts[k] for k in hoisted]
            keep = [k for k in range(len(self.consts)) if k not in set(hoisted)]
            self.constvars = [self.constvars[k] for k in keep]
            self.consts = [self.consts[k] for k in keep]
        else:
            outer = []
        jaxpr = jexc.Jaxpr(
            self.constvars,
            invars,
            outvars,
            _live(self.eqns, outvars),
            frozenset(self.effects),
            jexc.DebugInfo("quaxify", self.name, None, None),
        )
        return jexc.ClosedJaxpr(jaxpr, self.consts), out_spec, outer

    def _inputs(self, invals, folded, leaves, spec) -> list[Any]:
        invars: list[Any] = []
        leaf_iter, spec_iter = iter(leaves), iter(spec)
        for var, x, f in zip(self.jaxpr.invars, invals, folded, strict=True):
            if f:  # a scalar literal: handlers see it; other equations read a literal
                self.known[var] = x
                self.env[var] = jexc.Literal(
                    np.asarray(x, var.aval.dtype)[()], var.aval
                )
                continue
            s = next(spec_iter)
            if s is None:
                aval = _aval(next(leaf_iter))
                if aval != var.aval:
                    raise _Abort  # equations typed for another operand: walk
                invars.append(var)
            else:
                treedef, count = s
                atoms = [jexc.Var(_aval(next(leaf_iter))) for _ in range(count)]
                self.env[var] = Val(treedef, atoms)
                invars.extend(atoms)
        return invars

    def _outputs(self) -> tuple[list[Any], Any]:
        outvars: list[Any] = []
        spec: list[Any] = []
        for v in self.jaxpr.outvars:
            e = v if type(v) is jexc.Literal else self.env.get(v, v)
            if type(e) is Val:
                outvars.extend(e.atoms)
                spec.append((e.treedef, len(e.atoms)))
            else:
                outvars.append(e)
                spec.append(None)
        return outvars, tuple(spec)

    def _splice(self, rewriter: "EqnRewriter", eqn: Any) -> bool:
        """`eqn` rewritten without a fragment by `rewriter`, if it can."""
        reads = []
        for v in eqn.invars:
            if type(v) is not jexc.Literal:
                if v in self.known or v in self.lazy:
                    return False  # a constant its handler would see: a fragment
                v = self.env.get(v, v)
            reads.append(v)
        got = rewriter(eqn, reads)
        if got is None:
            return False
        new_eqn, outs, consts = got
        if _compat.has_input_effects(new_eqn.effects):
            return False
        for var, c in consts:
            self.constvars.append(var)
            self.consts.append(c)
        self.eqns.append(new_eqn)
        self.effects.update(new_eqn.effects)
        for var, out in zip(eqn.outvars, outs, strict=True):
            self.env[var] = out
        return True

    def _read(self, v: Any) -> Any:
        """How a fragment reads `v`: a constant, a `Val` or an atom."""
        if v in self.known:
            return self.known[v]
        eqn = self.lazy.get(v)
        if eqn is not None:  # a folded constant, computed the first time it is read
            (out,) = _bind_plain(
                eqn, [eqn.invars[0].val], source_info_util.current_name_stack(), True
            )
            self.known[v] = out
            return out
        e = self.env.get(v, v)
        if type(e) is jexc.Literal:
            return e.val
        return e

    def _fragment(self, start: int) -> int:
        """Trace the run of equations from `start` that values reach; splice it in.
        Returns the index of the first equation it did not run."""
        steps, last = self.steps, self.last
        end = min(len(steps), start + _WINDOW)
        # What the window reads from before it, in order: the fragment's inputs.
        defined: set[Any] = set()
        reads: list[Any] = []
        seen: set[Any] = set()
        for j in range(start, end):
            eqn = steps[j][0]
            for v in eqn.invars:
                if type(v) is not jexc.Literal and v not in defined and v not in seen:
                    seen.add(v)
                    reads.append(v)
            defined.update(eqn.outvars)
        atoms: list[Any] = []  # the outer atoms the fragment's inputs stand for
        builders: list[Any] = []
        for v in reads:
            r = self._read(v)
            if type(r) is Val:
                where = []
                for a in r.atoms:
                    if type(a) is jexc.Literal:
                        where.append(a)
                    else:
                        where.append(len(atoms))
                        atoms.append(a)
                builders.append((r.treedef, where))
            elif type(r) is jexc.Var:
                builders.append(len(atoms))
                atoms.append(r)
            else:
                builders.append((None, r))  # a constant
        stop = [start]
        outs: list[tuple[Any, Any]] = []

        def fragment(*args: Any) -> list[Any]:
            local: dict[Any, Any] = {}
            for v, b in zip(reads, builders, strict=True):
                local[v] = _build(b, args)
            j = start
            while j < end:
                eqn = steps[j][0]
                invals = [
                    v.val if type(v) is jexc.Literal else local[v] for v in eqn.invars
                ]
                if j > start and eqn.primitive in EQN_REWRITERS:
                    break  # may be spliced without a fragment: see `_splice`
                if any(isinstance(x, Value) for x in invals):
                    outvals = run_eqn(eqn, invals)
                elif j == start:  # an equation that must be bound (effects, ...)
                    outvals = bind(eqn, invals)
                else:
                    break
                for var, x in zip(eqn.outvars, outvals, strict=True):
                    local[var] = x
                j += 1
            stop[0] = j
            flat: list[Any] = []
            for k in range(start, j):
                for var in steps[k][0].outvars:
                    if last.get(var, -1) >= j:
                        x = local[var]
                        if isinstance(x, Value):
                            xl, xt = jax.tree_util.tree_flatten(x)
                            outs.append((var, (xt, len(xl))))
                            flat.extend(xl)
                        else:
                            outs.append((var, None))
                            flat.append(x)
            return flat

        with source_info_util.reset_name_stack():
            fjaxpr, fconsts = _compat.trace_flat(
                fragment, [a.aval for a in atoms], "quaxify", named_args=False
            )
        if _compat.has_input_effects(fjaxpr.effects):
            raise _Abort
        self.effects.update(fjaxpr.effects)
        sub = dict(zip(fjaxpr.invars, atoms, strict=True))
        self.constvars.extend(fjaxpr.constvars)
        self.consts.extend(fconsts)
        for eqn in fjaxpr.eqns:
            if any(type(v) is not jexc.Literal and v in sub for v in eqn.invars):
                eqn = eqn.replace(invars=[_sub(sub, v) for v in eqn.invars])
            self.eqns.append(eqn)
        results = as_reads(
            [s for _, s in outs], iter(_sub(sub, v) for v in fjaxpr.outvars)
        )
        for (var, _), r in zip(outs, results, strict=True):
            self.env[var] = r
        return stop[0]


def _live(eqns: list[Any], outvars: list[Any]) -> list[Any]:
    """`eqns` without those whose results nothing reads (and that have no effects):
    kept equations a handler made dead (`z * y` with `z` a `Zero`), and folded
    constants only handlers read."""
    live = {v for v in outvars if type(v) is not jexc.Literal}
    kept = []
    for eqn in reversed(eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if type(v) is not jexc.Literal)
    kept.reverse()
    return kept


def _build(builder: Any, args: Sequence[Any]) -> Any:
    if type(builder) is int:
        return args[builder]
    treedef, where = builder
    if treedef is None:
        return where  # a constant
    leaves = [
        args[w]
        if type(w) is int
        else _compat.weak_scalar_like(w.val, w.aval.dtype, w.aval.weak_type)
        for w in where
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _sub(sub: dict[Any, Any], v: Any) -> Any:
    return v if type(v) is jexc.Literal else sub.get(v, v)


def _aval(leaf: Any) -> Any:
    if isinstance(leaf, jax.core.ShapedArray):
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.core.ShapedArray(
            leaf.shape, leaf.dtype, weak_type=getattr(leaf, "weak_type", False)
        )
    return jax.typeof(leaf)
