"""Programs: a chain of catalogue operations applied to a value, and how they are drawn.

A `Program` is plain data (frozen dataclasses all the way down), so its `repr` is the
readable, evaluable text printed on failure. It runs as
`run_program(skeleton, literals, v, s, extras)`: the Python scalars of the program
(`literals`) are passed separately from its structure (`skeleton`), as top-level static
arguments, the way a user passes `f(v, 0.0)`. Two programs that differ only in a
signed zero therefore share every cache key that compares `0.0 == -0.0`, which is what
the "twin" run of the eager mode checks.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


nan = math.nan
inf = math.inf

#: Python scalars a program may hold (folded into the jaxpr as literals).
LITERALS: tuple[Any, ...] = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    -2.5,
    3,
    -1,
    0,
    True,
    nan,
    inf,
    -inf,
    1e30,
)


def literal(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field holding a Python scalar of the program (see `skeleton`)."""
    return dataclasses.field(default=default, metadata={"literal": True})


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where the `index`-th literal goes in a skeleton."""

    index: int


def map_literals(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """`obj` with every literal field (recursively, through dataclasses and tuples)
    replaced by `fn(field value)`."""
    if isinstance(obj, tuple):
        return tuple(map_literals(o, fn) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("literal"):
                changes[f.name] = fn(value)
            else:
                new = map_literals(value, fn)
                if new is not value:
                    changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


def skeleton(ops: tuple) -> tuple[tuple, tuple]:
    """Split `ops` into its structure (literals replaced by `Slot`s) and its literals."""
    found: list[Any] = []

    def take(value):
        if value is None:
            return None
        found.append(value)
        return Slot(len(found) - 1)

    return map_literals(ops, take), tuple(found)


def fill(skel: tuple, literals: tuple) -> tuple:
    """The inverse of `skeleton`."""
    return map_literals(skel, lambda s: literals[s.index] if isinstance(s, Slot) else s)


def _twin_of(value: Any) -> Any:
    """A scalar that compares equal to `value` (and hashes the same) but computes
    differently: the other signed zero."""
    if isinstance(value, float) and value == 0.0:
        return -value
    return value


def twin(ops: tuple) -> tuple | None:
    """`ops` with every signed zero flipped, or None if it holds none."""
    new = map_literals(ops, _twin_of)
    changed = any(
        math.copysign(1, a) != math.copysign(1, b)
        for a, b in zip(skeleton(ops)[1], skeleton(new)[1], strict=True)
        if isinstance(a, float)
    )
    return new if changed else None


# -- plain inputs ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Extra:
    """A plain input array of the program, made from the program's seed.

    `kind`: "normal" (standard normal floats), "special" (normal floats with some
    0.0, -0.0, NaN, +-inf), "index" (ints in `[lo, hi)`), "mask" (bools)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "normal"
    lo: int = 0
    hi: int = 0

    def make(self, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "index":
            return rng.integers(self.lo, self.hi, self.shape).astype(self.dtype)
        if self.kind == "mask":
            return rng.random(self.shape) < 0.5
        out = rng.standard_normal(self.shape)
        if self.kind == "special":
            specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0])
            pick = rng.random(self.shape) < 0.3
            out = np.where(pick, rng.choice(specials, self.shape), out)
        return out.astype(self.dtype)

    def aval(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))


def make_extras(specs: tuple[Extra, ...], seed: int) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(spec.make(rng)) for spec in specs)


class Env:
    """What an operation may read besides the running array `x`: the program's value
    `v` (a quax value, or its dense array), the plain scalar `s` and the extras."""

    def __init__(self, v: Any, s: Any, extras: tuple):
        self.v = v
        self.s = s
        self.extras = extras


@dataclasses.dataclass(frozen=True)
class Arg:
    """An operand: "x" (the running array), "v" (the program's value), "s" (the
    plain scalar), "e" (the plain input `extras[index]`) or "lit" (a Python scalar)."""

    kind: str
    index: int = 0
    lit: Any = literal(None)

    def get(self, x: Any, env: Env) -> Any:
        if self.kind == "x":
            return x
        if self.kind == "v":
            return env.v
        if self.kind == "s":
            return env.s
        if self.kind == "e":
            return env.extras[self.index]
        if self.kind == "lit":
            return self.lit
        if self.kind == "none":
            return None
        raise ValueError(self.kind)


@dataclasses.dataclass(frozen=True)
class Program:
    """`ops` applied in turn to the value; every intermediate is an output."""

    ops: tuple
    extras: tuple[Extra, ...]
    s: float
    seed: int

    def text(self) -> str:
        lines = [f"Program(s={self.s!r}, seed={self.seed}, extras=("]
        lines += [f"    {e!r}," for e in self.extras]
        lines.append("), ops=(")
        lines += [f"    {op!r}," for op in self.ops]
        lines.append("))")
        return "\n".join(lines)


def apply_ops(ops: tuple, x: Any, env: Env) -> Any:
    for op in ops:
        x = op.apply(x, env)
    return x


def run_program(skel: tuple, literals: tuple, v: Any, s: Any, extras: tuple) -> tuple:
    """The program on `v`: every intermediate result, in order."""
    env = Env(v, s, extras)
    x = v
    outs = []
    for op in fill(skel, literals):
        x = op.apply(x, env)
        outs.append(x)
    return tuple(outs)


def iter_ops(ops: tuple) -> Any:
    """Every operation of `ops`, and of their bodies, depth first."""
    for op in ops:
        yield op
        for f in dataclasses.fields(op):
            yield from _ops_in(getattr(op, f.name))


def _ops_in(value: Any) -> Any:
    if isinstance(value, tuple):
        for item in value:
            if hasattr(item, "apply"):
                yield from iter_ops((item,))
            else:
                yield from _ops_in(item)
