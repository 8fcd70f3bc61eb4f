"""`device_put`, `sharding_constraint` and `shard_map` (also `jax.pmap`, which JAX
0.10 builds from `shard_map`) with values among the operands.

A sharding (or `shard_map` spec) describes the *logical* array a value stands for; a
value's class says how it maps onto its leaves with `ArrayValue.leaf_specs(spec)` (the
default: leaves of the value's own shape take the spec, every other leaf is
replicated). Each handler then applies the primitive leaf by leaf, so a value is never
gathered or materialised to be placed:

- `device_put` and `sharding_constraint`: each leaf is placed with its own sharding.
- `shard_map`: each value is split into per-device values along the mapped axes (its
  leaves split by their specs), the body is walked on those, and per-device output
  values are reassembled by their specs. Collectives in the body (`psum`,
  `all_gather`, `ppermute`, ...) are ordinary primitives and dispatch like any other.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.tree_util as jtu
from jax.sharding import NamedSharding, PartitionSpec

from .. import _compat
from .._errors import (
    _MSG_BAD_LEAF_SPECS,
    _MSG_BAD_SHARD,
    HandlerResultError,
    describe_aval,
)
from .._values import ArrayValue, Value, aval_of
from .._walker import register, walk
from ._common import dense, flatten_operands, unflatten_operands


def leaf_specs(x: Any, spec: PartitionSpec) -> list[PartitionSpec]:
    """One `PartitionSpec` per leaf of `x` (in `jtu.tree_leaves` order) for the logical
    spec `spec`: `x.leaf_specs(spec)` for a value, `[spec]` for an array."""
    if not isinstance(x, Value):
        return [spec]
    leaves = jtu.tree_leaves(x)
    if not isinstance(x, ArrayValue):
        return [spec] * len(leaves)
    tree = x.leaf_specs(spec)
    specs = jtu.tree_leaves(tree, is_leaf=lambda s: isinstance(s, PartitionSpec))
    if len(specs) != len(leaves) or not all(
        isinstance(s, PartitionSpec) for s in specs
    ):
        raise HandlerResultError(
            _MSG_BAD_LEAF_SPECS.format(
                cls=type(x).__name__, n_leaves=len(leaves), got=_describe(specs)
            )
        )
    return specs


def leaf_shardings(x: Any, sharding: Any) -> Any:
    """The sharding of each leaf of `x`, as a pytree shaped like `x`, for a sharding
    of the logical array `x` stands for. A `NamedSharding` goes through
    `leaf_specs`; any other sharding (a single device, ...) applies to every leaf.

    Use it wherever JAX wants shardings for a value's leaves:
    `jax.jit(quaxify(f), in_shardings=(quax.leaf_shardings(w, s), ...))`,
    `jax.device_put(w, quax.leaf_shardings(w, s))`.
    """
    if not isinstance(x, Value):
        return sharding
    leaves, treedef = jtu.tree_flatten(x)
    if isinstance(sharding, NamedSharding):
        specs = leaf_specs(x, sharding.spec)
        out = [NamedSharding(sharding.mesh, s) for s in specs]
    else:
        out = [sharding] * len(leaves)
    return jtu.tree_unflatten(treedef, out)


def _describe(specs: Sequence[Any]) -> str:
    return f"{len(specs)} entries ({', '.join(type(s).__name__ for s in specs[:4])})"


# -- device_put and sharding_constraint --------------------------------------------------


@register(_compat.device_put_p)
def device_put_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    params = eqn.params
    leaves, spec = flatten_operands(invals)
    # Per-operand tuples (`devices`, `srcs`, `copy_semantics`) repeat for each leaf,
    # except that a NamedSharding of a value is mapped onto its leaves.
    out_params: dict[str, list[Any]] = {name: [] for name in params}
    for k, (x, s) in enumerate(zip(invals, spec, strict=True)):
        n = 1 if s is None else s[1]
        for name, entries in params.items():
            entry = entries[k]
            if name == "devices" and isinstance(x, Value) and entry is not None:
                shardings = jtu.tree_leaves(leaf_shardings(x, entry))
                out_params[name].extend(shardings)
            else:
                out_params[name].extend([entry] * n)
    bind_params = {name: tuple(v) for name, v in out_params.items()}
    out = eqn.primitive.bind(*leaves, **bind_params)
    return unflatten_operands(out, spec)


@register(_compat.sharding_constraint_p)
def sharding_constraint_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    (x,) = invals
    params = eqn.params
    sharding = params["sharding"]
    if params.get("unconstrained_dims") or params.get("layout") is not None:
        # Unconstrained dimensions and layouts name dimensions of the logical array,
        # which need not be dimensions of every leaf.
        return [eqn.primitive.bind(dense(x, eqn, invals), **params)]
    shardings = leaf_shardings(x, sharding)
    return [
        jtu.tree_map(
            lambda leaf, s: eqn.primitive.bind(leaf, **dict(params, sharding=s)),
            x,
            shardings,
        )
    ]


# -- shard_map ---------------------------------------------------------------------------


@register(_compat.shard_map_p)
def shard_map_handler(eqn: Any, invals: list[Any]) -> list[Any]:
    params = eqn.params
    jaxpr, mesh = params["jaxpr"], params["mesh"]
    in_specs, out_specs = tuple(params["in_specs"]), tuple(params["out_specs"])
    leaves, spec = flatten_operands(invals)
    # `jax.shard_map` calls its function with positional args: specs as a tuple.
    leaf_in_specs = tuple(
        s for x, p in zip(invals, in_specs, strict=True) for s in leaf_specs(x, p)
    )
    # Each value's structure for one shard: its treedef with static fields resized.
    local_spec = tuple(
        None if s is None else (_structure(x, var.aval.shape), s[1])
        for x, s, var in zip(invals, spec, jaxpr.invars, strict=True)
    )
    box: list[Any] = []

    def body(*local_leaves: Any) -> list[Any]:
        local = unflatten_operands(local_leaves, local_spec)
        for x, var in zip(local, jaxpr.invars, strict=True):
            _check(x, var.aval, "one shard of")
        outs = walk(jaxpr, (), local)
        out_leaves, _ = flatten_operands(outs)
        # Static data only (treedefs and specs): nothing here outlives the trace.
        global_spec = tuple(
            None if not isinstance(y, Value) else (_structure(y, var.aval.shape), n)
            for y, var, n in zip(
                outs, eqn.outvars, (len(jtu.tree_leaves(y)) for y in outs), strict=True
            )
        )
        specs = [
            s for y, p in zip(outs, out_specs, strict=True) for s in leaf_specs(y, p)
        ]
        box.append((global_spec, specs))
        return out_leaves

    kwargs = dict(
        mesh=mesh,
        in_specs=leaf_in_specs,
        check_vma=params.get("check_vma", True),
        axis_names=set(params.get("newly_manual_axes", mesh.axis_names)),
    )
    # Pass 1: the body's output kinds (and so its leaves' specs) are known only once it
    # is traced, and `jax.shard_map` wants `out_specs` first. Trace it under a
    # placeholder spec (`P()`, a prefix of any output tree; nothing is computed): a
    # complaint about that placeholder comes only after the body ran, and is moot.
    try:
        jax.eval_shape(
            lambda *ls: jax.shard_map(body, out_specs=PartitionSpec(), **kwargs)(*ls),
            *leaves,
        )
    except Exception:
        if not box:
            raise  # the body itself failed: the user's error, raised as is
    _, leaf_out_specs = box[-1]
    # Pass 2: the real `shard_map`, over leaves, with the leaves' own specs. Runs in
    # the context `run_eqn` set for `eqn`, so it keeps the user's line.
    out_leaves = jax.shard_map(body, out_specs=leaf_out_specs, **kwargs)(*leaves)
    outs = unflatten_operands(out_leaves, box[-1][0])
    for y, var in zip(outs, eqn.outvars, strict=True):
        _check(y, var.aval, "the reassembled")
    return outs


def _structure(x: Any, shape: Sequence[int]) -> Any:
    """The treedef of `x` as a block of `shape` (`ArrayValue.shard_structure`)."""
    if isinstance(x, ArrayValue):
        x = x.shard_structure(tuple(shape))
    return jtu.tree_structure(x)


def _check(x: Any, expected: Any, what: str) -> None:
    if not isinstance(x, ArrayValue):
        return
    got = aval_of(x)
    if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
        raise HandlerResultError(
            _MSG_BAD_SHARD.format(
                cls=type(x).__name__,
                what=what,
                got=describe_aval(got),
                expected=describe_aval(expected),
            )
        )
