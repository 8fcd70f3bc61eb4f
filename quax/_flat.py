"""Flattening what `quaxify` is called with, and keying the trace on it.

`Flat.of(tree)` flattens with values as leaves, finds the values and arrays (the
traced program's inputs) and builds the trace key of the tree's structure and leaves.
A model given to `quaxify` is flattened once, not on every call (`fn_flat`, with
`FnMemo`): eager calls of a large model spend most of their Python time here.
"""

import threading
import weakref
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.tree_util as jtu
import numpy as np

from ._closures import lift_closure
from ._values import is_value
from ._walker import aval_key, static_key, treedef_key
from .handlers._common import flatten_operands


def is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


class Flat:
    """A flattened `(fn, args, kwargs)` (values as leaves): its leaves and structure,
    where its values and arrays are (`positions`), and the part of the trace key its
    structure and leaves determine (None: cannot be keyed)."""

    __slots__ = ("leaves", "treedefs", "positions", "key", "parts", "operands")

    def __init__(self, leaves, treedefs, positions, key, parts=()):
        self.leaves = leaves
        self.treedefs = treedefs  # one per part
        self.positions = positions
        self.key = key
        self.parts = parts  # a joined pair: the two `Flat`s
        # `flatten_operands` of the values and arrays (for the compiled eager call),
        # computed when first asked.
        self.operands: Any = None

    @staticmethod
    def of(tree: Any) -> "Flat":
        leaves, treedef = jtu.tree_flatten(tree, is_leaf=is_value)
        positions = tuple(i for i, x in enumerate(leaves) if is_value(x) or is_array(x))
        return Flat(leaves, (treedef,), positions, _flat_key(leaves, treedef))

    def join(self, other: "Flat") -> "Flat":
        n = len(self.leaves)
        key = None
        if self.key is not None and other.key is not None:
            key = self.key + other.key
        return Flat(
            self.leaves + other.leaves,
            self.treedefs + other.treedefs,
            self.positions + tuple(n + i for i in other.positions),
            key,
            (self, other),
        )

    def treedef(self) -> Any:
        """The structure of the whole tree: `(fn, args, kwargs)` for a joined pair."""
        if len(self.treedefs) == 1:
            return self.treedefs[0]
        fn_def, rest = self.treedefs
        args_def, kwargs_def = rest.children()
        return jtu.treedef_tuple((fn_def, args_def, kwargs_def))


def _flat_key(leaves: list[Any], treedef: Any) -> "tuple[Key, ...] | None":
    """What the program traced from a tree depends on: its structure and static
    leaves by `treedef_key`/`static_key` (so `f(v, 0.0)` and `f(v, -0.0)`, or
    `f(v, 1)` and `f(v, True)`, are different programs), each value's structure, and
    each array leaf's aval with its weak type. None if a static part is unhashable."""
    parts: list[Any] = [treedef_key(treedef)]
    for x in leaves:  # in leaf order: `f(2.0, v)` is not `f(v, 2.0)`
        if is_value(x):
            vleaves, vtreedef = jtu.tree_flatten(x)
            vavals = tuple(aval_key(jax.typeof(v)) for v in vleaves)
            parts.append((treedef_key(vtreedef), vavals))
        elif is_array(x):
            parts.append(aval_key(jax.typeof(x)))
        else:
            parts.append(("static", static_key(x)))
    try:
        return (Key(tuple(parts)),)
    except TypeError:
        return None


class Key:
    """A hashable key whose hash is computed once (a model's key is a large tuple,
    and is looked up on every call)."""

    __slots__ = ("parts", "_hash")

    def __init__(self, parts: tuple[Any, ...]):
        self.parts = parts
        self._hash = hash(parts)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            type(other) is Key
            and self._hash == other._hash
            and self.parts == other.parts
        )


def operands(flat: Flat) -> tuple[list[Any], Any, bool]:
    """`flatten_operands` of `flat`'s values and arrays, and whether any of their
    leaves is a tracer; remembered in `flat` (a remembered model's are computed
    once)."""
    if flat.operands is None:
        if flat.parts:
            leaves: list[Any] = []
            spec: tuple[Any, ...] = ()
            traced = False
            for part in flat.parts:
                part_leaves, part_spec, part_traced = operands(part)
                leaves += part_leaves
                spec += part_spec
                traced = traced or part_traced
            flat.operands = (leaves, spec, traced)
        else:
            leaves, spec = flatten_operands([flat.leaves[i] for i in flat.positions])
            traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
            flat.operands = (leaves, spec, traced)
    return flat.operands


class FnMemo:
    """`Flat`s of the functions given to `quaxify`, by object identity, held weakly.

    A model called again and again eagerly (`quaxify(model)(x)`) is flattened and
    keyed once, not on every call. Only for an equinox Module whose tree is built of
    Modules, tuples, lists, dicts and None, with arrays and immutable static data: its
    leaves and structure change only where a list or dict in it is changed in place,
    and each use checks that every one of those still holds the same objects."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Flat, tuple[Any, ...]]] = {}
        self._seen: dict[int, tuple[weakref.ref]] = {}
        # Reentrant: a weakref callback (`_forgetter`) can run inside a locked block,
        # whenever the garbage collector does.
        self._lock = threading.RLock()

    def seen_before(self, fn: Any) -> bool:
        """Whether `fn` was met before (it is, from now on). A model is remembered on
        its second call: `quaxify(model)(x)` in a loop makes a new wrapper (and a
        new copy of `model`) every time, and is not worth remembering."""
        key = id(fn)
        entry = self._seen.get(key)
        if entry is not None and entry[0]() is fn:
            return True
        try:
            ref = weakref.ref(fn, self._forgetter(self._seen, key))
        except TypeError:
            return False
        with self._lock:
            self._seen[key] = (ref,)
        return False

    def _forgetter(self, entries: dict[int, Any], key: int) -> Any:
        def forget(ref: weakref.ref) -> None:
            with self._lock:
                entry = entries.get(key)
                if entry is not None and entry[0] is ref:
                    del entries[key]

        return forget

    def get(self, fn: Any) -> "Flat | None":
        entry = self._entries.get(id(fn))
        if entry is None or entry[0]() is not fn:
            return None
        _, flat, snapshots = entry
        for container, snapshot in snapshots:
            if not _unchanged(container, snapshot):
                return None
        return flat

    def put(self, fn: Any, flat: Flat, containers: list[Any]) -> None:
        key = id(fn)
        try:
            ref = weakref.ref(fn, self._forgetter(self._entries, key))
        except TypeError:
            return
        snapshots = tuple((c, _snapshot(c)) for c in containers)
        with self._lock:
            self._entries[key] = (ref, flat, snapshots)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _snapshot(container: Any) -> tuple[Any, ...]:
    return tuple(container.items()) if type(container) is dict else tuple(container)


def _unchanged(container: Any, snapshot: tuple[Any, ...]) -> bool:
    if len(container) != len(snapshot):
        return False
    if type(container) is dict:
        return all(k in container and container[k] is v for k, v in snapshot) and list(
            container
        ) == [k for k, _ in snapshot]
    return all(a is b for a, b in zip(container, snapshot, strict=True))


FN_MEMO = FnMemo()


def fn_flat(fn: Any) -> Flat:
    """`Flat.of(fn)`, once per model (see `FnMemo`). Values captured by a closure,
    bound method or partial become inputs (`lift_closure`) on every call: a closure's
    cells and a function's globals can be rebound."""
    flat = FN_MEMO.get(fn)
    if flat is not None:
        return flat
    flat = Flat.of(lift_closure(fn))
    if isinstance(fn, eqx.Module) and flat.key is not None and FN_MEMO.seen_before(fn):
        containers = _mutable_containers(fn)
        if containers is not None:
            FN_MEMO.put(fn, flat, containers)
    return flat


_NODES = (tuple, list, dict, type(None))


def _mutable_containers(tree: Any) -> list[Any] | None:
    """The lists and dicts of `tree` (a pytree of Modules, tuples, lists, dicts and
    None), or None if it has another kind of node, a numpy leaf (which can be
    reshaped in place), a tracer or mutable static data."""
    found: list[Any] = []
    ok = True

    def visit(x: Any) -> bool:
        nonlocal ok
        if isinstance(x, np.ndarray | jax.core.Tracer):
            ok = False  # a tracer: this model lives in one trace; never reused
            return True
        if isinstance(x, jax.Array):
            return True  # values are looked into: their fields are checked too
        t = type(x)
        if t is list or t is dict:
            found.append(x)
        return False

    _, treedef = jtu.tree_flatten(tree, is_leaf=visit)
    if not ok:
        return None
    pending = [treedef]
    while pending:
        node = pending.pop()
        data = node.node_data()
        if data is None:
            continue
        node_type, aux = data
        if not (node_type in _NODES or issubclass(node_type, eqx.Module)):
            return None
        if node_type not in _NODES and _holds_mutable(aux):
            return None
        pending.extend(node.children())
    return found


def _holds_mutable(aux: Any) -> bool:
    if isinstance(aux, list | dict | set | bytearray | np.ndarray):
        return True
    if isinstance(aux, tuple):
        return any(_holds_mutable(a) for a in aux)
    return False
