"""`while` (`lax.while_loop`, `fori_loop` with traced bounds) and `scan` (`lax.scan`,
`lax.map`, `fori_loop` with static bounds) with values as constants, carries, `xs` and
`ys`.

Values used as loop constants are closed over by the body, so their handlers run in
every iteration. A carry stays a value only if one iteration returns it as the same
kind of value (class, static fields, leaf shapes and dtypes); otherwise it is
re-expressed in one kind on entry and at the end of the body where its class can
`join` them (`ArrayValue.join`: a dense carry that the body makes a LoRA weight becomes
a LoRA weight with zero adapters), and else materialised there. The body is walked
once, while JAX traces the loop; only when a carry must enter in another kind is that
trace stopped and the loop traced again (a fixed point, at most three passes per
carry). A value as
`xs` is split by its class's `unstack` hook and a value among the `ys` is stacked by
its `stack` hook (both derived from `scan_leafwise()` by default); a value whose hook
returns None is materialised. Scans are emitted again through the public
`jax.lax.scan`; a `while` is bound again directly, on its walked cond and body traced to
jaxprs over the leaves, so JAX's own rules apply (vmap with a batched predicate).

Inside quaxify's rewrite (`quax._rewrite`), a loop whose carries keep their kinds is
not walked at all: `rewrite_scan` and `rewrite_while` rewrite its body (and cond) as
jaxprs over the leaves, keeping the equations no value reaches, and make the new loop
equation directly. Where a carry changes kind, or a hook must run on arrays, they
decline and the handlers above run.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core as jexc
import jax.tree_util as jtu

from .. import _compat
from .._errors import (
    _MSG_BUG,
    HandlerResultError,
    QuaxBugError,
    describe_aval,
    format_site,
)
from .._rewrite import EQN_REWRITERS, Val, as_reads, read_leaves, rewrite
from .._strict import STATE
from .._values import ArrayValue, aval_of
from .._walker import bind, register, walk_closed
from ._common import (
    dense,
    flatten_operands,
    join_kinds,
    join_to,
    leaf_specs,
    leaf_type,
    unflatten_operands,
    value_type,
    value_types,
)


_MSG_BAD_STACK = """\
quax: {cls}.{hook}({length}) {what} at {site}, where `lax.scan` needs {expected}.
To fix: make {cls}.{hook} agree with {cls}.aval() (the slice at index i is \
`materialise(v)[i]`; the stack is the per-step values stacked along a new axis 0), \
or return None from it (False from {cls}.scan_leafwise()) to have quax materialise \
the value."""


@register(_compat.while_p)
def while_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    n_cond, n_body = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    carry = invals[n_cond + n_body :]
    return _settled(lambda plan: _while(eqn, invals, carry, plan), len(carry))


def _while(eqn: Any, invals: list[Any], carry: list[Any], plan: dict[int, Any]):
    """`while_handler` with the carries re-expressed as `plan` says (`_settled`);
    raises `_CarryChanged` if the body changes the kind of another carry."""
    params = eqn.params
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = invals[:n_cond]
    body_consts = invals[n_cond : n_cond + n_body]
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]
    carry = _densify_at(carry, plan, eqn)
    cond_leaves, cond_spec = flatten_operands(cond_consts)
    body_leaves, body_spec = flatten_operands(body_consts)
    carry_leaves, carry_spec = flatten_operands(carry)
    n_cc, n_bc = len(cond_leaves), len(body_leaves)

    def cond_fn(*leaves: Any) -> Any:
        consts = unflatten_operands(leaves[:n_cc], cond_spec)
        (pred,) = walk_closed(
            cond_jaxpr, [*consts, *unflatten_operands(leaves[n_cc:], carry_spec)]
        )
        return dense(pred, eqn, invals)

    # Leaves whose weak type the body changes are made strong on both sides, as
    # `lax.while_loop` does (a carry's leaf types must agree across iterations).
    strong: frozenset[int] = frozenset()

    def body_fn(*leaves: Any) -> list[Any]:
        consts = unflatten_operands(leaves[:n_bc], body_spec)
        carry = unflatten_operands(leaves[n_bc:], carry_spec)
        outs = walk_closed(body_jaxpr, [*consts, *carry])
        outs = _check_kinds(carry, _densify_at(outs, plan, eqn), plan, eqn)
        out_leaves, out_spec = flatten_operands(outs)
        if out_spec != carry_spec:
            raise QuaxBugError(_MSG_BUG.format(what="while carry types changed"))
        return [_strong(x) if i in strong else x for i, x in enumerate(out_leaves)]

    body_closed, body_hoisted = _trace(body_fn, [*body_leaves, *carry_leaves])
    out_weak = [getattr(a, "weak_type", False) for a in body_closed.out_avals]
    in_weak = [leaf_spec.weak_type for leaf_spec in leaf_specs(carry_leaves)]
    strong = frozenset(
        i for i, (a, b) in enumerate(zip(in_weak, out_weak, strict=True)) if a != b
    )
    if strong:
        carry_leaves = [
            _strong(x) if i in strong else x for i, x in enumerate(carry_leaves)
        ]
        body_closed, body_hoisted = _trace(body_fn, [*body_leaves, *carry_leaves])
    cond_closed, cond_hoisted = _trace(cond_fn, [*cond_leaves, *carry_leaves])
    # `while` is bound directly (not through `lax.while_loop`), so a loop that vmap
    # gave a batched predicate (its cond returns an array of bools) keeps JAX's own
    # rules for it.
    new_params = dict(
        params,
        cond_jaxpr=cond_closed,
        body_jaxpr=body_closed,
        cond_nconsts=len(cond_hoisted) + n_cc,
        body_nconsts=len(body_hoisted) + n_bc,
    )
    operands = [
        *cond_hoisted,
        *cond_leaves,
        *body_hoisted,
        *body_leaves,
        *carry_leaves,
    ]
    return unflatten_operands(bind(eqn, operands, new_params), carry_spec)


def _trace(fn: Callable[..., Any], leaves: Sequence[Any]) -> tuple[Any, list[Any]]:
    """`fn` traced on the types of `leaves`: see `_trace_specs`."""
    return _trace_specs(fn, leaf_specs(leaves))


def _trace_specs(fn: Callable[..., Any], specs: Sequence[Any]) -> tuple[Any, list[Any]]:
    """`fn` traced on `specs` to a jaxpr with no constants (loops take their
    constants as operands), and the constants it closed over."""
    jaxpr, consts = _compat.trace_flat(fn, specs, "quax loop body")
    return jexc.ClosedJaxpr(_compat.convert_constvars_jaxpr(jaxpr), ()), consts


def _strong(x: Any) -> Any:
    """`x` with a strong type (a weakly typed leaf becomes an ordinary one)."""
    if getattr(jax.typeof(x), "weak_type", False):
        return jax.lax.convert_element_type(x, jax.typeof(x).dtype)
    return x


@register(_compat.scan_p)
def scan_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    params = eqn.params
    n_consts, n_carry = _compat.scan_split(params, len(invals))
    consts = invals[:n_consts]
    carry = invals[n_consts : n_consts + n_carry]
    length = params["length"]
    sliced = [_unstack(x, length, eqn, invals) for x in invals[n_consts + n_carry :]]
    xs = [arrays for arrays, _ in sliced]
    body = params["jaxpr"]
    n_ys = len(eqn.outvars) - n_carry
    if len(body.jaxpr.outvars) != n_carry + n_ys:
        raise QuaxBugError(_MSG_BUG.format(what="scan body outputs != scan outputs"))

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        x = [
            piece if slicer is None else slicer(piece)
            for piece, (_, slicer) in zip(x, sliced, strict=True)
        ]
        outs = walk_closed(body, [*consts, *carry, *x])
        return outs[:n_carry], outs[n_carry:]

    # How each `y` is stacked, from the (last) trace of the body: None for an array.
    stackers: list[Any] = []

    def scan(plan: dict[int, Any]) -> tuple[Any, Any]:
        def body_fn(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
            new_carry, ys = step(carry, x)
            new_carry = _densify_at(new_carry, plan, eqn)
            new_carry = _check_kinds(carry, new_carry, plan, eqn)
            stackers.clear()
            out = []
            for y in ys:
                arrays, stacker = _stack(y, length, eqn, ys)
                out.append(arrays)
                stackers.append(stacker)
            return new_carry, out

        carry0 = _densify_at(carry, plan, eqn)
        if set(params) == _SCAN_PARAMS and _unplaced(invals):
            return _scan_direct(eqn, body_fn, carry0, xs)
        return jax.lax.scan(
            body_fn,
            carry0,
            xs,
            length=length,
            reverse=params["reverse"],
            unroll=params["unroll"],
        )

    new_carry, ys = _settled(scan, n_carry)
    ys = [
        arrays if stacker is None else stacker(arrays, var.aval)
        for arrays, stacker, var in zip(
            ys, stackers, eqn.outvars[n_carry:], strict=True
        )
    ]
    return [*new_carry, *ys]


#: The params of a `scan` equation in the JAX versions whose `scan_p` quax binds
#: directly (0.10.x); others (0.11's `ft_in`) go through `lax.scan`.
_SCAN_PARAMS = frozenset(
    ("reverse", "length", "jaxpr", "num_consts", "num_carry", "unroll")
)


def _unplaced(operands: Sequence[Any]) -> bool:
    """No leaf of `operands` carries varying manual axes (inside `shard_map`) or a
    sharding in its type, which a body traced on plain specs would drop."""
    return not any(_placed(jax.typeof(leaf)) for leaf in jtu.tree_leaves(operands))


def _placed(aval: Any) -> bool:
    if _compat.varying_axes(aval):
        return True
    sharding = getattr(aval, "sharding", None)
    return sharding is not None and any(
        p is not None for p in getattr(sharding, "spec", ())
    )


def rewrite_scan(
    eqn: Any, reads: list[Any]
) -> tuple[Any, list[Any], list[tuple[Any, Any]]] | None:
    """A `scan` met in a rewrite (`quax._rewrite`): the same `scan` equation over the
    leaves, made directly, its body rewritten as a jaxpr (equations no value reaches
    kept, the others traced as fragments) instead of walked in a second trace.

    None, and a fragment runs `scan_handler`, wherever the walk does more than this
    can say: a carry whose kind (or a leaf's weak type) one iteration changes, an
    `unstack` or `stack` hook that computes rather than regroups leaves, operands
    with a placement, a `scan` with other params (JAX 0.11), and under
    `quax.explain`."""
    params = eqn.params
    if STATE.recorder is not None or set(params) != _SCAN_PARAMS:
        return None
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    length = params["length"]
    operands: list[Any] = []  # the new equation's, after the hoisted constants
    leaves: list[Any] = []  # the body's inputs' avals
    spec: list[Any] = []
    counts: list[int] = []
    for k, r in enumerate(reads):
        is_x = k >= n_consts + n_carry
        if not isinstance(r, Val):
            atoms, s = [r], None
            body_leaves = [_sliced(r.aval) if is_x else r.aval]
        elif is_x:
            got = _unstack_abstract(r, length)
            if got is None:
                return None
            atoms, body_leaves, s = got
        else:
            atoms, s = r.atoms, (r.treedef, len(r.atoms))
            body_leaves = [a.aval for a in atoms]
        if any(_placed(a.aval) for a in atoms):
            return None
        operands.extend(atoms)
        leaves.extend(body_leaves)
        spec.append(s)
        counts.append(len(atoms))
    n = len(reads)
    got = rewrite(params["jaxpr"], [None] * n, [False] * n, leaves, tuple(spec), "scan")
    if got is None:
        return None
    closed, out_spec, hoisted = got
    n_cl = sum(counts[:n_consts])  # leaves of the consts
    n_ck = sum(counts[n_consts : n_consts + n_carry])  # and of the carries
    carry_in = closed.in_avals[n_cl : n_cl + n_ck]
    if (
        hoisted
        or tuple(out_spec[:n_carry]) != tuple(spec[n_consts : n_consts + n_carry])
        or list(closed.out_avals[:n_ck]) != list(carry_in)
    ):
        return None  # a carry changes kind: `scan_handler` finds the fixed point
    jaxpr = closed.jaxpr
    # Each `y`: which of the body's results are stacked, and how the stacked value
    # is rebuilt from the scan's results (None for an array).
    body_out = list(jaxpr.outvars[:n_ck])
    y_plans: list[Any] = []
    k = n_ck
    for y, s in zip(eqn.outvars[n_carry:], out_spec[n_carry:], strict=True):
        if s is None:
            body_out.append(jaxpr.outvars[k])
            y_plans.append(None)
            k += 1
            continue
        got = _stack_abstract(s[0], closed.out_avals[k : k + s[1]], length, y.aval)
        if got is None:
            return None
        picks, rebuilt = got
        body_out.extend(jaxpr.outvars[k + p] for p in picks)
        y_plans.append((len(picks), rebuilt))
        k += s[1]
    body, consts = _hoist(jaxpr.replace(outvars=body_out), closed.consts)
    new_params = dict(
        params,
        jaxpr=body,
        num_consts=len(consts) + n_cl,
        num_carry=n_ck,
    )
    ys = [_stacked(v.aval, length) for v in body_out[n_ck:]]
    jaxpr = body.jaxpr
    outvars = [jexc.Var(a) for a in [*carry_in, *ys]]
    new_eqn = jexc.new_jaxpr_eqn(
        [v for v, _ in consts] + operands,
        outvars,
        eqn.primitive,
        new_params,
        jaxpr.effects,
        eqn.source_info,
        eqn.ctx,
    )
    it = iter(outvars)
    outs = as_reads(out_spec[:n_carry], it)
    for plan in y_plans:
        if plan is None:
            outs.append(next(it))
        else:
            count, (treedef, where) = plan
            stacked = [next(it) for _ in range(count)]
            outs.append(Val(treedef, [stacked[w] for w in where]))
    return new_eqn, outs, consts


def _hoist(jaxpr: Any, consts: Sequence[Any]) -> tuple[Any, list[tuple[Any, Any]]]:
    """A loop body (`jaxpr` with `consts`, as `rewrite` made it) with no constants:
    they become its leading inputs, read from new outer variables (returned with
    their values), as loops take their constants as operands."""
    if not jaxpr.constvars:
        return jexc.ClosedJaxpr(jaxpr, ()), []
    outer = [
        (jexc.Var(v.aval), c) for v, c in zip(jaxpr.constvars, consts, strict=True)
    ]
    return jexc.ClosedJaxpr(_compat.convert_constvars_jaxpr(jaxpr), ()), outer


#: The params of a `while` equation that `rewrite_while` knows (0.10 and 0.11).
_WHILE_PARAMS = frozenset(("cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts"))


def rewrite_while(
    eqn: Any, reads: list[Any]
) -> tuple[Any, list[Any], list[tuple[Any, Any]]] | None:
    """A `while` met in a rewrite (`quax._rewrite`): the same `while` equation over
    the leaves, its cond and body rewritten as jaxprs, as `rewrite_scan` does. None
    (and a fragment runs `while_handler`) where a carry's kind or a leaf's weak type
    changes in one iteration, the cond returns a value, operands have a placement,
    or under `quax.explain`."""
    params = eqn.params
    if STATE.recorder is not None or set(params) != _WHILE_PARAMS:
        return None
    n_cc, n_bc = params["cond_nconsts"], params["body_nconsts"]
    groups = [reads[:n_cc], reads[n_cc : n_cc + n_bc], reads[n_cc + n_bc :]]
    flat = []
    for group in groups:
        atoms, spec = read_leaves(group)
        if any(_placed(a.aval) for a in atoms):
            return None
        flat.append((atoms, [a.aval for a in atoms], spec))
    (
        (c_atoms, c_avals, c_spec),
        (b_atoms, b_avals, b_spec),
        (k_atoms, k_avals, k_spec),
    ) = flat
    n_c, n_b = len(groups[0]), len(groups[1])
    cond = rewrite(
        params["cond_jaxpr"],
        [None] * (n_c + len(k_spec)),
        [False] * (n_c + len(k_spec)),
        [*c_avals, *k_avals],
        (*c_spec, *k_spec),
        "while_cond",
    )
    if cond is None:
        return None
    body = rewrite(
        params["body_jaxpr"],
        [None] * (n_b + len(k_spec)),
        [False] * (n_b + len(k_spec)),
        [*b_avals, *k_avals],
        (*b_spec, *k_spec),
        "while_body",
    )
    if body is None:
        return None
    (cond_closed, cond_out, cond_hoisted), (body_closed, body_out, body_hoisted) = (
        cond,
        body,
    )
    if (
        cond_hoisted
        or body_hoisted
        or cond_out != (None,)
        or tuple(body_out) != tuple(k_spec)
        or list(body_closed.out_avals) != list(k_avals)
    ):
        return None  # a carry changes kind: `while_handler` finds the fixed point
    cond_jaxpr, cond_consts = _hoist(cond_closed.jaxpr, cond_closed.consts)
    body_jaxpr, body_consts = _hoist(body_closed.jaxpr, body_closed.consts)
    new_params = dict(
        params,
        cond_jaxpr=cond_jaxpr,
        body_jaxpr=body_jaxpr,
        cond_nconsts=len(cond_consts) + len(c_atoms),
        body_nconsts=len(body_consts) + len(b_atoms),
    )
    outvars = [jexc.Var(a) for a in k_avals]
    operands = [
        *(v for v, _ in cond_consts),
        *c_atoms,
        *(v for v, _ in body_consts),
        *b_atoms,
        *k_atoms,
    ]
    new_eqn = jexc.new_jaxpr_eqn(
        operands,
        outvars,
        eqn.primitive,
        new_params,
        {*cond_jaxpr.effects, *body_jaxpr.effects},
        eqn.source_info,
        eqn.ctx,
    )
    return new_eqn, as_reads(k_spec, iter(outvars)), cond_consts + body_consts


def _unstack_abstract(r: Any, length: int) -> tuple[list[Any], list[Any], Any] | None:
    """A value among a `scan`'s `xs`, given as a `Val`, split by its `unstack` hook
    on abstract leaves: the outer atoms the body's slices come from, the slices (as
    `jax.ShapeDtypeStruct`s, in the order of the rebuilt value's leaves) and the
    rebuilt value's spec. None unless the hook only regroups the leaves: `arrays`
    are some of the value's own leaves, and the rebuilt value's leaves are some of
    their slices (anything else needs the walk, where the hook runs on arrays)."""
    full = [_abstract(a.aval) for a in r.atoms]
    try:
        x = jtu.tree_unflatten(r.treedef, full)
        hook = type(x).unstack(x, length) if isinstance(x, ArrayValue) else None
        if hook is None:
            return None
        arrays, rebuild = hook
        position = {id(leaf): k for k, leaf in enumerate(full)}
        array_leaves, array_def = jtu.tree_flatten(arrays)
        which = [position.get(id(leaf)) for leaf in array_leaves]
        if any(k is None or full[k].shape[:1] != (length,) for k in which):
            return None
        slices = [_abstract(r.atoms[k].aval, sliced=True) for k in which]  # type: ignore[index]
        piece = rebuild(jtu.tree_unflatten(array_def, slices))
        aval = aval_of(x)
        got = aval_of(piece) if isinstance(piece, ArrayValue) else None
        expected = jax.core.ShapedArray(tuple(aval.shape)[1:], aval.dtype)
        if got is None or not _same_shape_dtype(got, expected):
            return None
        piece_leaves, piece_def = jtu.tree_flatten(piece)
    except Exception:  # the hook needs real arrays: the walk runs it
        return None
    at = {id(s): which[k] for k, s in enumerate(slices)}
    ks = [at.get(id(leaf)) for leaf in piece_leaves]
    if any(k is None for k in ks):
        return None
    atoms = [r.atoms[k] for k in ks]  # type: ignore[index]
    return atoms, [_sliced(a.aval) for a in atoms], (piece_def, len(piece_leaves))


def _stack_abstract(
    treedef: Any, avals: Sequence[Any], length: int, expected: Any
) -> tuple[list[int], tuple[Any, list[int]]] | None:
    """A value among a `scan`'s `ys` (its treedef and leaf avals in the body), stacked
    by its `stack` hook on abstract leaves: which of its leaves the scan stacks, and
    the stacked value's treedef with, per leaf, which stacked result it is. None
    unless the hook only regroups leaves (as `_unstack_abstract`), or if the stacked
    value's aval is not `expected`."""
    step = [_abstract(a) for a in avals]
    try:
        y = jtu.tree_unflatten(treedef, step)
        hook = type(y).stack(y, length) if isinstance(y, ArrayValue) else None
        if hook is None:
            return None
        arrays, rebuild = hook
        position = {id(leaf): k for k, leaf in enumerate(step)}
        array_leaves, array_def = jtu.tree_flatten(arrays)
        picks = [position.get(id(leaf)) for leaf in array_leaves]
        if any(k is None for k in picks):
            return None
        stacked = [_abstract(_stacked(avals[k], length)) for k in picks]  # type: ignore[index]
        whole = rebuild(jtu.tree_unflatten(array_def, stacked))
        got = aval_of(whole) if isinstance(whole, ArrayValue) else None
        if got is None or not _same_shape_dtype(got, expected):
            return None
        whole_leaves, whole_def = jtu.tree_flatten(whole)
    except Exception:  # the hook needs real arrays: the walk runs it
        return None
    at = {id(s): k for k, s in enumerate(stacked)}
    where = [at.get(id(leaf)) for leaf in whole_leaves]
    if any(w is None for w in where):
        return None
    return picks, (whole_def, where)  # type: ignore[return-value]


def _stacked(aval: Any, length: int) -> Any:
    return aval.update(shape=(length, *aval.shape))


def _abstract(aval: Any, sliced: bool = False) -> jax.ShapeDtypeStruct:
    """`aval` as a `jax.ShapeDtypeStruct`, without its leading axis if `sliced`."""
    shape = tuple(aval.shape)[1:] if sliced else tuple(aval.shape)
    return jax.ShapeDtypeStruct(
        shape, aval.dtype, weak_type=getattr(aval, "weak_type", False)
    )


def _sliced(aval: Any) -> Any:
    return aval.update(shape=tuple(aval.shape)[1:])


EQN_REWRITERS[_compat.scan_p] = rewrite_scan
EQN_REWRITERS[_compat.while_p] = rewrite_while


def _scan_direct(
    eqn: Any, body_fn: Callable[..., Any], carry: Sequence[Any], xs: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    """What `lax.scan(body_fn, carry, xs)` returns, with `scan` bound directly on
    `body_fn` traced once to a jaxpr over the leaves (`lax.scan` traces it through
    its own wrapper, checks and closure conversion, which cost about as much again
    as the walk of a small body). What `body_fn` closes over (the scan's consts)
    becomes the equation's leading operands."""
    carry_leaves, carry_spec = flatten_operands(list(carry))
    x_leaves, x_def = jtu.tree_flatten(list(xs))
    n_c = len(carry_leaves)
    ys_def: list[Any] = []
    strong: frozenset[int] = frozenset()

    def flat_body(*leaves: Any) -> list[Any]:
        carry_in = unflatten_operands(leaves[:n_c], carry_spec)
        new_carry, ys = body_fn(carry_in, jtu.tree_unflatten(x_def, leaves[n_c:]))
        out_leaves, out_spec = flatten_operands(new_carry)
        if out_spec != carry_spec:
            raise QuaxBugError(_MSG_BUG.format(what="scan carry types changed"))
        y_leaves, y_def = jtu.tree_flatten(ys)
        ys_def[:] = [y_def]
        out_leaves = [
            _strong(x) if i in strong else x for i, x in enumerate(out_leaves)
        ]
        return [*out_leaves, *y_leaves]

    def trace() -> tuple[Any, list[Any]]:
        specs = [*leaf_specs(carry_leaves), *(_slice_spec(x) for x in x_leaves)]
        return _trace_specs(flat_body, specs)

    closed, hoisted = trace()
    out_weak = [getattr(a, "weak_type", False) for a in closed.out_avals[:n_c]]
    in_weak = [spec.weak_type for spec in leaf_specs(carry_leaves)]
    strong = frozenset(
        i for i, (a, b) in enumerate(zip(in_weak, out_weak, strict=True)) if a != b
    )
    if strong:  # as `lax.scan` does: such a carry is strongly typed on both sides
        carry_leaves = [
            _strong(x) if i in strong else x for i, x in enumerate(carry_leaves)
        ]
        closed, hoisted = trace()
    operands = [*hoisted, *carry_leaves, *x_leaves]
    params = dict(eqn.params, jaxpr=closed, num_consts=len(hoisted), num_carry=n_c)
    outs = bind(eqn, operands, params)
    new_carry = unflatten_operands(outs[:n_c], carry_spec)
    return new_carry, jtu.tree_unflatten(ys_def[0], outs[n_c:])


def _unstack(x: Any, length: int, eqn: Any, operands: Sequence[Any]) -> Any:
    """`(arrays, slicer)` for one operand of `xs`: a plain array (a value quax
    materialises) and None, or the pytree of arrays its `unstack` hook split it into
    and the function rebuilding the value at one index from their slices."""
    hook = type(x).unstack(x, length) if isinstance(x, ArrayValue) else None
    if hook is None:
        return dense(x, eqn, operands), None
    arrays, rebuild = hook
    cls = type(x).__name__
    for leaf in jtu.tree_leaves(arrays):
        shape, _ = leaf_type(leaf)
        if not shape or shape[0] != length:
            raise HandlerResultError(
                _MSG_BAD_STACK.format(
                    cls=cls,
                    hook="unstack",
                    length=length,
                    what=f"returned an array of shape {shape}",
                    site=format_site(eqn.source_info),
                    expected=f"a leading axis of size {length} on every array",
                )
            )
    aval = aval_of(x)
    expected = jax.core.ShapedArray(tuple(aval.shape)[1:], aval.dtype)

    def slicer(pieces: Any) -> Any:
        piece = rebuild(pieces)
        _check_aval(piece, expected, cls, "unstack", length, eqn)
        return piece

    return arrays, slicer


def _stack(y: Any, length: int, eqn: Any, ys: Sequence[Any]) -> Any:
    """`(arrays, stacker)` for one `y` of the body: a plain array (a value quax
    materialises) and None, or the arrays its `stack` hook returned and the function
    building the stacked value from them, stacked, and checking its aval."""
    hook = type(y).stack(y, length) if isinstance(y, ArrayValue) else None
    if hook is None:
        return dense(y, eqn, ys), None
    arrays, rebuild = hook
    cls = type(y).__name__

    def stacker(stacked: Any, expected: Any) -> Any:
        out = rebuild(stacked)
        _check_aval(out, expected, cls, "stack", length, eqn)
        return out

    return arrays, stacker


class _CarryChanged(Exception):
    """Raised while tracing a loop body that changes the kind of some carries:
    `changes` maps each position to the kind it must enter in instead (a value with
    abstract leaves to `join` into), or None to materialise it."""

    def __init__(self, changes: dict[int, Any]):
        super().__init__(changes)
        self.changes = changes
        self.trace = _compat.current_trace()  # the loop body's, now abandoned


def _check_kinds(
    before: Sequence[Any], after: Sequence[Any], plan: dict[int, Any], eqn: Any
) -> list[Any]:
    """`after` (one iteration's carries), if each keeps the kind it had `before`:
    a carry the body returns in another kind is joined into the carry's kind where
    its class can (`join_kinds`), and a plain carry that comes back a value that
    cannot join it is materialised at once (that changes nothing on entry); any other
    change stops the trace."""
    after = list(after)
    changes: dict[int, Any] = {}
    for i, (a, b) in enumerate(
        zip(value_types(before), value_types(after), strict=True)
    ):
        if a == b:
            continue
        forced_dense = i in plan and plan[i] is None
        target = None if forced_dense else join_kinds([before[i], after[i]])
        if target is not None and value_type(target) == a:
            after[i] = join_to(target, after[i], eqn, after)
        elif target is not None:  # a wider kind holds both: enter in it
            changes[i] = target
        elif a is None:
            after[i] = dense(after[i], eqn, after)
        else:
            changes[i] = None
    if changes:
        raise _CarryChanged(changes)
    return after


def _settled(emit: Callable[[dict[int, Any]], Any], n_carry: int) -> Any:
    """`emit(plan)`, where `plan` says how each carry whose kind one iteration would
    change enters the loop (joined into a kind, or materialised: `_densify_at`), so
    every carry keeps its kind. Found while tracing the real loop: a body that
    changes a carry's kind stops its trace (`_CarryChanged`) and is traced again, so
    the body is walked once when the kinds hold (the usual case). A carry is joined
    at most twice, then materialised, and stays so: at most `3 * n_carry + 1`
    traces."""
    plan: dict[int, Any] = {}
    changes_at: dict[int, int] = {}
    for _ in range(3 * n_carry + 1):
        try:
            return emit(plan)
        except _CarryChanged as changed:
            changes = changed.changes
            # JAX frees a trace's tracers when the trace ends normally; a stopped
            # body's trace is released here, or it would keep an outer trace's
            # tracers alive (JAX's leak checker reports them).
            _compat.release_trace(changed.trace)
            changed.trace = changed.__traceback__ = None
        for i, target in changes.items():
            changes_at[i] = changes_at.get(i, 0) + 1
            plan[i] = target if changes_at[i] <= 2 else None
    raise QuaxBugError(_MSG_BUG.format(what="loop carry types did not settle"))


def _densify_at(vals: Sequence[Any], plan: dict[int, Any], eqn: Any) -> list[Any]:
    """`vals` re-expressed as `plan` says: joined into a kind, or materialised."""
    return [
        join_to(plan[i], x, eqn, vals) if i in plan else x for i, x in enumerate(vals)
    ]


def _slice_spec(leaf: Any) -> jax.ShapeDtypeStruct:
    aval = jax.typeof(leaf)
    return jax.ShapeDtypeStruct(
        tuple(aval.shape)[1:], aval.dtype, weak_type=getattr(aval, "weak_type", False)
    )


def _check_aval(
    x: Any, expected: Any, cls: str, hook: str, length: int, eqn: Any
) -> None:
    got = aval_of(x) if isinstance(x, ArrayValue) else None
    if got is None or not _same_shape_dtype(got, expected):
        what = (
            f"built {describe_aval(got)}"
            if got is not None
            else f"built a {type(x).__name__}, not an ArrayValue,"
        )
        raise HandlerResultError(
            _MSG_BAD_STACK.format(
                cls=cls,
                hook=hook,
                length=length,
                what=what,
                site=format_site(eqn.source_info),
                expected=describe_aval(expected),
            )
        )


def _same_shape_dtype(a: Any, b: Any) -> bool:
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
