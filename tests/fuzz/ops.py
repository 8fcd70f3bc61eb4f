"""The catalogue: every operation a fuzzed program may apply to its running array `x`.

Each entry of `CATALOGUE` is a frozen dataclass with `apply(x, env)` (the operation,
written as a user would, with `jax.numpy`/`jax.lax`) and a `draw(gen, x, depth)`
classmethod that draws its parameters to fit `x` (a `jax.ShapeDtypeStruct`). Several
names can share a class (`Unary(fn="sin")`, `Unary(fn="exp")`, ...): a name is one
entry of the catalogue.
"""

import dataclasses
import functools as ft
import math
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.special as jsp

from .draw import MAX_DEPTH, Gen
from .program import Arg, apply_ops, literal


CATALOGUE: dict[str, Any] = {}


def register(
    *names: str,
    body: bool = False,
    control: bool = False,
    weight: int = 1,
    kinds: tuple[str, ...] | None = None,
) -> Callable:
    """Register a draw function (`draw(name, gen, x, depth)`) under each of `names`.
    `body`: usable in a loop or branch body; `control`: has bodies of its own;
    `weight`: how often it is drawn, relative to an elementwise operation; `kinds`:
    the builder kinds whose programs draw it (None: every kind)."""

    def decorate(fn):
        for name in names:
            CATALOGUE[name] = _Entry(ft.partial(fn, name), body, control, weight, kinds)
        return fn

    return decorate


@dataclasses.dataclass(frozen=True)
class _Entry:
    draw: Callable[..., Any]
    body: bool
    control: bool
    weight: int
    kinds: tuple[str, ...] | None


# -- operands ------------------------------------------------------------------------


# -- elementwise -----------------------------------------------------------------------

UNARY: dict[str, Callable[[Any], Any]] = {
    "neg": jnp.negative,
    "abs": jnp.abs,
    "sin": jnp.sin,
    "cos": jnp.cos,
    "tanh": jnp.tanh,
    "exp": jnp.exp,
    "log": jnp.log,
    "sqrt": jnp.sqrt,
    "rsqrt": lax.rsqrt,
    "square": jnp.square,
    "cube": lambda x: x**3,
    "reciprocal": jnp.reciprocal,
    "sign": jnp.sign,
    "floor": jnp.floor,
    "ceil": jnp.ceil,
    "round": jnp.round,
    "trunc": jnp.trunc,
    "sigmoid": jax.nn.sigmoid,
    "expm1": jnp.expm1,
    "log1p": jnp.log1p,
    "erf": jsp.erf,
    "arctan": jnp.arctan,
    "sinh": jnp.sinh,
    "cbrt": jnp.cbrt,
    "isnan": jnp.isnan,
    "isinf": jnp.isinf,
    "signbit": jnp.signbit,
    "logical_not": jnp.logical_not,
    "nan_to_num": jnp.nan_to_num,
    "stop_gradient": lax.stop_gradient,
    "real": jnp.real,
}


@dataclasses.dataclass(frozen=True)
class Unary:
    fn: str

    def apply(self, x, env):
        return UNARY[self.fn](x)


@register(*UNARY, body=True)
def _draw_unary(name, gen, x, depth):
    return Unary(name)


BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": jnp.add,
    "sub": jnp.subtract,
    "mul": jnp.multiply,
    "div": jnp.divide,
    "max": jnp.maximum,
    "min": jnp.minimum,
    "pow": jnp.power,
    "atan2": jnp.arctan2,
    "fmod": jnp.fmod,
    "remainder": jnp.remainder,
    "floor_divide": jnp.floor_divide,
    "copysign": jnp.copysign,
    "nextafter": jnp.nextafter,
    "logaddexp": jnp.logaddexp,
    "lt": jnp.less,
    "le": jnp.less_equal,
    "eq": jnp.equal,
    "ne": jnp.not_equal,
    "gt": jnp.greater,
    "logical_and": jnp.logical_and,
    "logical_or": jnp.logical_or,
    "logical_xor": jnp.logical_xor,
}


@dataclasses.dataclass(frozen=True)
class Binary:
    """`fn(x, other)`, or `fn(other, x)` if `swap`."""

    fn: str
    other: Arg
    swap: bool = False

    def apply(self, x, env):
        y = self.other.get(x, env)
        return BINARY[self.fn](y, x) if self.swap else BINARY[self.fn](x, y)


@register(*BINARY, body=True)
def _draw_binary(name, gen, x, depth):
    return Binary(name, gen.other(x), gen.boolean())


@dataclasses.dataclass(frozen=True)
class Astype:
    dtype: str

    def apply(self, x, env):
        return x.astype(self.dtype)


@register("astype")
def _draw_astype(name, gen, x, depth):
    return Astype(
        gen.choice(("float32", "float16", "bfloat16", "int32", "bool", "float32"))
    )


@dataclasses.dataclass(frozen=True)
class Clip:
    lo: Arg
    hi: Arg

    def apply(self, x, env):
        return jnp.clip(x, self.lo.get(x, env), self.hi.get(x, env))


@register("clip", body=True, weight=2)
def _draw_clip(name, gen, x, depth):
    kinds = ("none", "s", "e", "lit", "lit")

    def bound():
        arg = gen.other(x, kinds=kinds)
        return arg

    return Clip(bound(), bound())


@dataclasses.dataclass(frozen=True)
class Where:
    """`jnp.where(cond, x, other)` (or the cases swapped); `cond` is `x > c` for a
    literal `c`, a plain mask, or `s > 0`."""

    cond: str
    other: Arg
    swap: bool
    c: Any = literal(None)
    mask: int = 0

    def apply(self, x, env):
        if self.cond == "cmp":
            cond = x > self.c
        elif self.cond == "mask":
            cond = env.extras[self.mask]
        else:
            cond = env.s > 0
        y = self.other.get(x, env)
        return jnp.where(cond, y, x) if self.swap else jnp.where(cond, x, y)


@register("where", body=True, weight=3)
def _draw_where(name, gen, x, depth):
    cond = gen.choice(("cmp", "mask", "s"))
    c = gen.literal() if cond == "cmp" else None
    mask = (
        gen.plain(gen.broadcastable(x.shape), "bool", "mask") if cond == "mask" else 0
    )
    return Where(cond, gen.other(x), gen.boolean(), c, mask)


# -- reductions ------------------------------------------------------------------------

REDUCE: dict[str, Callable[..., Any]] = {
    "sum": jnp.sum,
    "prod": jnp.prod,
    "reduce_max": jnp.max,
    "reduce_min": jnp.min,
    "mean": jnp.mean,
    "any": jnp.any,
    "all": jnp.all,
    "logsumexp": jax.nn.logsumexp,
    "var": jnp.var,
}


@dataclasses.dataclass(frozen=True)
class Reduce:
    fn: str
    axis: Any
    keepdims: bool

    def apply(self, x, env):
        return REDUCE[self.fn](x, axis=self.axis, keepdims=self.keepdims)


@register(*REDUCE, weight=2)
def _draw_reduce(name, gen, x, depth):
    axis = None if x.ndim == 0 or gen.integer(0, 3) == 0 else gen.axes(x.ndim)
    return Reduce(name, axis, gen.boolean())


@dataclasses.dataclass(frozen=True)
class ArgReduce:
    fn: str
    axis: int | None
    keepdims: bool

    def apply(self, x, env):
        fn = jnp.argmax if self.fn == "argmax" else jnp.argmin
        return fn(x, axis=self.axis, keepdims=self.keepdims)


@register("argmax", "argmin")
def _draw_argreduce(name, gen, x, depth):
    axis = None if x.ndim == 0 or gen.boolean() else gen.axis(x.ndim)
    return ArgReduce(name, axis, gen.boolean())


CUMULATIVE = {
    "cumsum": lax.cumsum,
    "cumprod": lax.cumprod,
    "cummax": lax.cummax,
    "cumlogsumexp": lax.cumlogsumexp,
}


@dataclasses.dataclass(frozen=True)
class Cumulative:
    fn: str
    axis: int
    reverse: bool

    def apply(self, x, env):
        return CUMULATIVE[self.fn](x, axis=self.axis, reverse=self.reverse)


@register(*CUMULATIVE, body=True)
def _draw_cumulative(name, gen, x, depth):
    if x.ndim == 0:
        return None
    return Cumulative(name, gen.axis(x.ndim, negative=False), gen.boolean())


# -- shapes ----------------------------------------------------------------------------


def _factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@dataclasses.dataclass(frozen=True)
class Reshape:
    shape: tuple[int, ...]

    def apply(self, x, env):
        return jnp.reshape(x, self.shape)


@register("reshape", weight=2)
def _draw_reshape(name, gen, x, depth):
    rank = gen.integer(0 if math.prod(x.shape) == 1 else 1, 4)
    dims = [1] * rank
    if rank:
        for f in _factors(math.prod(x.shape)):
            dims[gen.integer(0, rank - 1)] *= f
        if gen.boolean():
            dims[gen.integer(0, rank - 1)] = -1
    elif math.prod(x.shape) != 1:
        return None
    return Reshape(tuple(dims))


@dataclasses.dataclass(frozen=True)
class Transpose:
    perm: tuple[int, ...]

    def apply(self, x, env):
        return jnp.transpose(x, self.perm)


@register("transpose", weight=2)
def _draw_transpose(name, gen, x, depth):
    return Transpose(tuple(gen.permutation(range(x.ndim))))


@dataclasses.dataclass(frozen=True)
class ExpandDims:
    axis: int

    def apply(self, x, env):
        return jnp.expand_dims(x, self.axis)


@register("expand_dims")
def _draw_expand_dims(name, gen, x, depth):
    return ExpandDims(gen.axis(x.ndim + 1))


@dataclasses.dataclass(frozen=True)
class Squeeze:
    axes: tuple[int, ...] | None

    def apply(self, x, env):
        return jnp.squeeze(x, self.axes)


@register("squeeze")
def _draw_squeeze(name, gen, x, depth):
    ones = [i for i, d in enumerate(x.shape) if d == 1]
    if not ones:
        return None
    return Squeeze(
        None
        if gen.boolean()
        else tuple(sorted(gen.draw(st.sets(st.sampled_from(ones), min_size=1))))
    )


@dataclasses.dataclass(frozen=True)
class BroadcastTo:
    shape: tuple[int, ...]

    def apply(self, x, env):
        return jnp.broadcast_to(x, self.shape)


@register("broadcast_to", weight=2)
def _draw_broadcast_to(name, gen, x, depth):
    shape = tuple(gen.integer(1, 3) if d == 1 else d for d in x.shape)
    if gen.boolean():
        shape = (gen.integer(1, 2), *shape)
    return BroadcastTo(shape)


@dataclasses.dataclass(frozen=True)
class Flip:
    axis: int | None

    def apply(self, x, env):
        return jnp.flip(x, self.axis)


@register("flip", body=True)
def _draw_flip(name, gen, x, depth):
    return Flip(None if x.ndim == 0 or gen.boolean() else gen.axis(x.ndim))


@dataclasses.dataclass(frozen=True)
class Roll:
    shift: int
    axis: int | None

    def apply(self, x, env):
        return jnp.roll(x, self.shift, self.axis)


@register("roll", body=True)
def _draw_roll(name, gen, x, depth):
    return Roll(
        gen.integer(-5, 5), None if x.ndim == 0 or gen.boolean() else gen.axis(x.ndim)
    )


@dataclasses.dataclass(frozen=True)
class Swapaxes:
    a: int
    b: int

    def apply(self, x, env):
        return jnp.swapaxes(x, self.a, self.b)


@register("swapaxes")
def _draw_swapaxes(name, gen, x, depth):
    if x.ndim == 0:
        return None
    return Swapaxes(gen.axis(x.ndim), gen.axis(x.ndim))


@dataclasses.dataclass(frozen=True)
class Ravel:
    def apply(self, x, env):
        return jnp.ravel(x)


@register("ravel")
def _draw_ravel(name, gen, x, depth):
    return Ravel()


@dataclasses.dataclass(frozen=True)
class Pad:
    """`jnp.pad` (`mode` constant, edge, reflect or wrap)."""

    widths: tuple[tuple[int, int], ...]
    mode: str
    c: Any = literal(None)

    def apply(self, x, env):
        if self.mode == "constant":
            return jnp.pad(x, self.widths, constant_values=self.c)
        return jnp.pad(x, self.widths, mode=self.mode)


@register("pad", weight=2)
def _draw_pad(name, gen, x, depth):
    widths = tuple((gen.integer(0, 2), gen.integer(0, 2)) for _ in x.shape)
    mode = gen.choice(("constant", "constant", "edge", "reflect", "wrap"))
    return Pad(widths, mode, gen.literal() if mode == "constant" else None)


@dataclasses.dataclass(frozen=True)
class LaxPad:
    """`lax.pad` with negative (cropping) and interior padding."""

    config: tuple[tuple[int, int, int], ...]
    c: Any = literal(0.0)

    def apply(self, x, env):
        return lax.pad(x, jnp.asarray(self.c, x.dtype), self.config)


@register("lax_pad", weight=2)
def _draw_lax_pad(name, gen, x, depth):
    config = tuple(
        (gen.integer(-1, 2), gen.integer(-1, 2), gen.integer(0, 1)) for _ in x.shape
    )
    return LaxPad(config, gen.literal())


@dataclasses.dataclass(frozen=True)
class Tile:
    reps: tuple[int, ...]

    def apply(self, x, env):
        return jnp.tile(x, self.reps)


@register("tile")
def _draw_tile(name, gen, x, depth):
    return Tile(tuple(gen.integer(1, 2) for _ in x.shape))


@dataclasses.dataclass(frozen=True)
class Repeat:
    repeats: int
    axis: int | None

    def apply(self, x, env):
        return jnp.repeat(x, self.repeats, axis=self.axis)


@register("repeat")
def _draw_repeat(name, gen, x, depth):
    return Repeat(
        gen.integer(1, 2), None if x.ndim == 0 or gen.boolean() else gen.axis(x.ndim)
    )


@dataclasses.dataclass(frozen=True)
class Triangle:
    upper: bool
    k: int

    def apply(self, x, env):
        return (jnp.triu if self.upper else jnp.tril)(x, self.k)


@register("triu")
def _draw_triangle(name, gen, x, depth):
    if x.ndim < 2:
        return None
    return Triangle(gen.boolean(), gen.integer(-2, 2))


@dataclasses.dataclass(frozen=True)
class Diagonal:
    offset: int
    a: int
    b: int

    def apply(self, x, env):
        return jnp.diagonal(x, self.offset, self.a, self.b)


@register("diagonal")
def _draw_diagonal(name, gen, x, depth):
    if x.ndim < 2:
        return None
    a, b = gen.permutation(range(x.ndim))[:2]
    return Diagonal(gen.integer(-1, 1), a, b)


@dataclasses.dataclass(frozen=True)
class LaxSlice:
    start: tuple[int, ...]
    limit: tuple[int, ...]
    strides: tuple[int, ...]

    def apply(self, x, env):
        return lax.slice(x, self.start, self.limit, self.strides)


@register("lax_slice", weight=2)
def _draw_lax_slice(name, gen, x, depth):
    start, limit = [], []
    for d in x.shape:
        a = gen.integer(0, d - 1) if d else 0
        start.append(a)
        limit.append(gen.integer(a + 1, d) if d else 0)
    return LaxSlice(
        tuple(start), tuple(limit), tuple(gen.integer(1, 2) for _ in x.shape)
    )


# -- contractions ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DotGeneral:
    """`lax.dot_general(x, other)` (or swapped) with the given dimension numbers."""

    other: Arg
    dims: tuple
    swap: bool
    preferred: str | None = None
    precision: str | None = None

    def apply(self, x, env):
        y = self.other.get(x, env)
        (lc, rc), (lb, rb) = self.dims
        kwargs = dict(precision=self.precision, preferred_element_type=self.preferred)
        if self.swap:
            return lax.dot_general(y, x, ((rc, lc), (rb, lb)), **kwargs)
        return lax.dot_general(x, y, self.dims, **kwargs)


def _pairs(
    gen: Gen,
    lhs: tuple[int, ...],
    rhs: tuple[int, ...],
    count: int,
    used_l: set,
    used_r: set,
) -> list[tuple[int, int]]:
    out = []
    for _ in range(count):
        options = [
            (i, j)
            for i in range(len(lhs))
            for j in range(len(rhs))
            if lhs[i] == rhs[j] and i not in used_l and j not in used_r
        ]
        if not options:
            break
        i, j = gen.choice(options)
        used_l.add(i)
        used_r.add(j)
        out.append((i, j))
    return out


@register("dot_general", weight=6)
def _draw_dot_general(name, gen, x, depth):
    kind = gen.choice(("e", "e", "v", "x"))
    if kind == "e":
        # Build a plain operand around random batch and contracting axes of x.
        axes = gen.permutation(range(x.ndim))
        n_batch = gen.integer(0, min(1, x.ndim))
        n_contract = gen.integer(0, x.ndim - n_batch)
        batch, contract = axes[:n_batch], axes[n_batch : n_batch + n_contract]
        free = [gen.integer(1, 3) for _ in range(gen.integer(0, 2))]
        slots = (
            [("b", i) for i in batch]
            + [("c", i) for i in contract]
            + [("f", d) for d in free]
        )
        slots = gen.permutation(slots)
        shape = tuple(x.shape[i] if k != "f" else i for k, i in slots)
        rb = tuple(slots.index(("b", i)) for i in batch)
        rc = tuple(slots.index(("c", i)) for i in contract)
        other = Arg("e", index=gen.plain(shape))
        dims = ((tuple(contract), rc), (tuple(batch), rb))
    else:
        rhs = gen.v_aval.shape if kind == "v" else x.shape
        used_l: set = set()
        used_r: set = set()
        batch = _pairs(gen, x.shape, rhs, gen.integer(0, 1), used_l, used_r)
        contract = _pairs(gen, x.shape, rhs, gen.integer(0, 2), used_l, used_r)
        other = Arg(kind)
        dims = (
            (tuple(i for i, _ in contract), tuple(j for _, j in contract)),
            (tuple(i for i, _ in batch), tuple(j for _, j in batch)),
        )
    preferred = gen.choice((None, None, "float32"))
    precision = gen.choice((None, None, "highest"))
    return DotGeneral(other, dims, gen.boolean(), preferred, precision)


@dataclasses.dataclass(frozen=True)
class Matmul:
    """`x @ e` or `e @ x`."""

    other: Arg
    swap: bool

    def apply(self, x, env):
        y = self.other.get(x, env)
        return y @ x if self.swap else x @ y


@register("matmul", weight=2)
def _draw_matmul(name, gen, x, depth):
    if x.ndim == 0:
        return None
    swap = gen.boolean() and x.ndim >= 2
    k = gen.integer(1, 3)
    if swap:
        shape = (k, x.shape[-2])
    else:
        shape = (x.shape[-1],) if gen.boolean() else (x.shape[-1], k)
    return Matmul(Arg("e", index=gen.plain(shape)), swap)


@dataclasses.dataclass(frozen=True)
class Outer:
    other: Arg

    def apply(self, x, env):
        return jnp.outer(x, self.other.get(x, env))


@register("outer")
def _draw_outer(name, gen, x, depth):
    return Outer(Arg("e", index=gen.plain((gen.integer(1, 3),))))


# -- indexing and gathers --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StaticIndex:
    """`x[items]`: ("i", k) an int, ("s", start, stop, step) a slice, ("n",) None,
    ("e",) an Ellipsis."""

    items: tuple

    def apply(self, x, env):
        index = []
        for item in self.items:
            if item[0] == "i":
                index.append(item[1])
            elif item[0] == "s":
                index.append(slice(*item[1:]))
            elif item[0] == "n":
                index.append(None)
            else:
                index.append(Ellipsis)
        return x[tuple(index)]


@register("index", weight=3)
def _draw_index(name, gen, x, depth):
    items: list = []
    for d in x.shape[: gen.integer(0, x.ndim)]:
        kind = gen.choice(("i", "s", "s", "n"))
        if kind == "i":
            items.append(("i", gen.integer(-d, d - 1)))
        elif kind == "s":
            start = gen.choice((None, gen.integer(-d - 1, d + 1)))
            stop = gen.choice((None, gen.integer(-d - 1, d + 1)))
            items.append(("s", start, stop, gen.choice((None, 1, 2, -1, -2))))
        else:
            items.append(("n",))
    if items and gen.boolean():
        items.insert(gen.integer(0, len(items)), ("e",))
    return StaticIndex(tuple(items))


@dataclasses.dataclass(frozen=True)
class ArrayIndex:
    """`x[idx]` or `x[..., idx]` with an int array (in bounds, possibly negative)."""

    idx: int
    last: bool

    def apply(self, x, env):
        idx = env.extras[self.idx]
        return x[..., idx] if self.last else x[idx]


@register("array_index", weight=2)
def _draw_array_index(name, gen, x, depth):
    if x.ndim == 0:
        return None
    last = gen.boolean()
    n = x.shape[-1] if last else x.shape[0]
    return ArrayIndex(gen.indices((gen.integer(1, 3),), n, oob=False), last)


@dataclasses.dataclass(frozen=True)
class Take:
    """`jnp.take(x, idx, axis, mode=..., fill_value=...)`."""

    idx: int
    axis: int | None
    mode: str | None
    fill: Any = literal(None)

    def apply(self, x, env):
        return jnp.take(
            x,
            env.extras[self.idx],
            axis=self.axis,
            mode=self.mode,
            fill_value=self.fill,
        )


@register("take", weight=3)
def _draw_take(name, gen, x, depth):
    axis = None if x.ndim == 0 or gen.boolean() else gen.axis(x.ndim)
    n = math.prod(x.shape) if axis is None else x.shape[axis]
    modes = (None, "fill", "clip", "wrap", "promise_in_bounds")
    mode = gen.choice(modes if n else modes[:-1])  # no index is in an empty axis
    shape = (gen.integer(1, 3),) if gen.boolean() else (2, 2)
    if mode == "promise_in_bounds":
        idx = gen.plain(shape, "int32", "index", 0, n)
    else:
        idx = gen.indices(shape, n, oob=True)
    fill = gen.literal() if mode in (None, "fill") and gen.boolean() else None
    return Take(idx, axis, mode, fill)


@dataclasses.dataclass(frozen=True)
class AtGet:
    """`x.at[idx].get(mode=..., fill_value=...)`, idx an int array or a static int."""

    idx: int | None
    static: int
    mode: str | None
    fill: Any = literal(None)

    def apply(self, x, env):
        idx = self.static if self.idx is None else env.extras[self.idx]
        return x.at[idx].get(mode=self.mode, fill_value=self.fill)


@register("at_get", weight=3)
def _draw_at_get(name, gen, x, depth):
    if x.ndim == 0:
        return None
    n = x.shape[0]
    mode = gen.choice((None, "fill", "clip", "drop", "promise_in_bounds"))
    oob = mode not in (None, "promise_in_bounds")
    if gen.boolean():
        idx, static = (
            None,
            gen.integer(-2 * n - 1, 2 * n + 1) if oob else gen.integer(-n, n - 1),
        )
    else:
        idx, static = gen.indices((gen.integer(1, 3),), n, oob), 0
    fill = gen.literal() if mode in ("fill", "drop") and gen.boolean() else None
    return AtGet(idx, static, mode, fill)


@dataclasses.dataclass(frozen=True)
class TakeAlongAxis:
    idx: int
    axis: int
    mode: str | None

    def apply(self, x, env):
        return jnp.take_along_axis(
            x, env.extras[self.idx], axis=self.axis, mode=self.mode
        )


@register("take_along_axis", weight=2)
def _draw_take_along_axis(name, gen, x, depth):
    if x.ndim == 0:
        return None
    axis = gen.axis(x.ndim, negative=False)
    shape = tuple(gen.integer(1, 3) if i == axis else d for i, d in enumerate(x.shape))
    mode = gen.choice((None, "fill", "clip"))
    return TakeAlongAxis(
        gen.indices(shape, x.shape[axis], oob=mode is not None), axis, mode
    )


# -- updates ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AtUpdate:
    """`x.at[idx].<method>(update, mode=...)`."""

    method: str
    idx: int | None
    static: int
    update: Arg
    mode: str | None

    def apply(self, x, env):
        idx = self.static if self.idx is None else env.extras[self.idx]
        ref = getattr(x.at[idx], self.method)
        return ref(self.update.get(x, env), mode=self.mode)


@register("at_set", "at_add", "at_mul", "at_min", "at_max", body=True, weight=2)
def _draw_at_update(name, gen, x, depth):
    if x.ndim == 0:
        return None
    method = name.removeprefix("at_")
    n = x.shape[0]
    mode = gen.choice((None, "drop", "clip", "promise_in_bounds", "fill"))
    oob = mode not in (None, "promise_in_bounds")
    if method == "set" or gen.boolean():  # `set` with repeated indices is unordered
        idx, static = (
            None,
            gen.integer(-2 * n - 1, 2 * n + 1) if oob else gen.integer(-n, n - 1),
        )
        slot = x.shape[1:]
    else:
        k = gen.integer(1, 3)
        idx, static = gen.indices((k,), n, oob), 0
        slot = (k, *x.shape[1:])
    kind = gen.choice(("e", "e", "s", "lit"))
    if kind == "e":
        update = Arg("e", index=gen.plain(gen.broadcastable(slot)))
    elif kind == "lit":
        update = Arg("lit", lit=gen.literal())
    else:
        update = Arg("s")
    return AtUpdate(method, idx, static, update, mode)


@dataclasses.dataclass(frozen=True)
class UpdateInto:
    """`e.at[i].set(x)` / `.add(x)`: the running array is the update of a plain one."""

    target: int
    index: int
    add: bool
    mode: str | None

    def apply(self, x, env):
        ref = env.extras[self.target].at[self.index]
        return ref.add(x, mode=self.mode) if self.add else ref.set(x, mode=self.mode)


@register("update_into", weight=2)
def _draw_update_into(name, gen, x, depth):
    k = gen.integer(1, 3)
    mode = gen.choice((None, "drop", "clip"))
    index = gen.integer(-k - 1, k) if mode else gen.integer(-k, k - 1)
    return UpdateInto(gen.plain((k, *x.shape)), index, gen.boolean(), mode)


@dataclasses.dataclass(frozen=True)
class DynamicSlice:
    """`lax.dynamic_slice`; each start is a Python int (possibly out of range) or a
    traced scalar from the extras."""

    starts: tuple
    sizes: tuple[int, ...]

    def apply(self, x, env):
        starts = [env.extras[i] if k == "e" else i for k, i in self.starts]
        return lax.dynamic_slice(x, starts, self.sizes)


def _starts(gen: Gen, shape: tuple[int, ...]) -> tuple:
    out = []
    for d in shape:
        if gen.boolean():
            out.append(("lit", gen.integer(-2, d + 1)))
        else:
            out.append(("e", gen.plain((), "int32", "index", -2, d + 2)))
    return tuple(out)


@register("dynamic_slice", weight=3)
def _draw_dynamic_slice(name, gen, x, depth):
    sizes = tuple(gen.integer(1, d) if d else 0 for d in x.shape)
    return DynamicSlice(_starts(gen, x.shape), sizes)


@dataclasses.dataclass(frozen=True)
class DynamicUpdateSlice:
    """`lax.dynamic_update_slice(x, e, starts)`, or `(e, x, starts)` if `into`."""

    other: int
    starts: tuple
    into: bool

    def apply(self, x, env):
        starts = [env.extras[i] if k == "e" else i for k, i in self.starts]
        y = env.extras[self.other]
        if self.into:
            return lax.dynamic_update_slice(y, x, starts)
        return lax.dynamic_update_slice(x, y.astype(x.dtype), starts)


@register("dynamic_update_slice", body=True, weight=3)
def _draw_dynamic_update_slice(name, gen, x, depth):
    into = gen.boolean()
    if into:
        shape = tuple(d + gen.integer(0, 2) for d in x.shape)
    else:
        shape = tuple(gen.integer(1, d) if d else 0 for d in x.shape)
    other = gen.plain(shape)
    return DynamicUpdateSlice(other, _starts(gen, shape if into else x.shape), into)


# -- joining and splitting -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Concatenate:
    other: Arg
    axis: int
    swap: bool

    def apply(self, x, env):
        y = self.other.get(x, env)
        return jnp.concatenate([y, x] if self.swap else [x, y], axis=self.axis)


@register("concatenate", weight=2)
def _draw_concatenate(name, gen, x, depth):
    if x.ndim == 0:
        return None
    axis = gen.axis(x.ndim)
    kind = gen.choice(("e", "e", "x", "v"))
    if kind == "e":
        shape = tuple(
            gen.integer(1, 3) if i == axis % x.ndim else d
            for i, d in enumerate(x.shape)
        )
        other = Arg("e", index=gen.plain(shape))
    else:
        other = Arg(kind)
    return Concatenate(other, axis, gen.boolean())


@dataclasses.dataclass(frozen=True)
class Stack:
    other: Arg
    axis: int
    swap: bool

    def apply(self, x, env):
        y = self.other.get(x, env)
        return jnp.stack([y, x] if self.swap else [x, y], axis=self.axis)


@register("stack", weight=2)
def _draw_stack(name, gen, x, depth):
    kind = gen.choice(("e", "x", "v"))
    other = Arg("e", index=gen.plain(x.shape)) if kind == "e" else Arg(kind)
    return Stack(other, gen.axis(x.ndim + 1), gen.boolean())


@dataclasses.dataclass(frozen=True)
class Split:
    """Piece `pick` of `jnp.split(x, at, axis)`."""

    at: tuple[int, ...]
    axis: int
    pick: int

    def apply(self, x, env):
        return jnp.split(x, list(self.at), axis=self.axis)[self.pick]


@register("split", weight=2)
def _draw_split(name, gen, x, depth):
    if x.ndim == 0:
        return None
    axis = gen.axis(x.ndim)
    d = x.shape[axis]
    at = tuple(sorted(gen.draw(st.sets(st.integers(0, d), min_size=1, max_size=2))))
    return Split(at, axis, gen.integer(0, len(at)))


# -- sorting ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sort:
    axis: int | None
    descending: bool
    stable: bool

    def apply(self, x, env):
        return jnp.sort(
            x, axis=self.axis, descending=self.descending, stable=self.stable
        )


@register("sort", body=True, weight=2)
def _draw_sort(name, gen, x, depth):
    axis = None if x.ndim == 0 or gen.integer(0, 3) == 0 else gen.axis(x.ndim)
    return Sort(axis, gen.boolean(), gen.boolean())


@dataclasses.dataclass(frozen=True)
class Argsort:
    axis: int
    descending: bool

    def apply(self, x, env):
        return jnp.argsort(x, axis=self.axis, descending=self.descending, stable=True)


@register("argsort")
def _draw_argsort(name, gen, x, depth):
    if x.ndim == 0:
        return None
    return Argsort(gen.axis(x.ndim), gen.boolean())


@dataclasses.dataclass(frozen=True)
class SortKeyed:
    """`lax.sort` of two operands along `axis`, one key; `x` is the key or the
    payload; returns operand `pick`."""

    other: int
    x_is_key: bool
    axis: int
    pick: int

    def apply(self, x, env):
        y = env.extras[self.other]
        ops = (x, y) if self.x_is_key else (y, x)
        return lax.sort(ops, dimension=self.axis, num_keys=1, is_stable=True)[self.pick]


@register("sort_keyed", weight=2)
def _draw_sort_keyed(name, gen, x, depth):
    if x.ndim == 0:
        return None
    return SortKeyed(
        gen.plain(x.shape, kind="normal"),
        gen.boolean(),
        gen.axis(x.ndim, negative=False),
        gen.integer(0, 1),
    )


@dataclasses.dataclass(frozen=True)
class TopK:
    k: int
    pick: int

    def apply(self, x, env):
        return lax.top_k(x, self.k)[self.pick]


@register("top_k")
def _draw_top_k(name, gen, x, depth):
    if x.ndim == 0:
        return None
    return TopK(gen.integer(1, x.shape[-1]), gen.integer(0, 1))


# -- control flow ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cond:
    """`lax.cond(pred, true_body, false_body, x)`; `pred` from `s`, from `x` (a
    value-derived predicate) or a Python bool."""

    pred: str
    true_body: tuple
    false_body: tuple
    c: Any = literal(None)

    def apply(self, x, env):
        if self.pred == "s":
            pred = env.s > 0
        elif self.pred == "x":
            pred = jnp.sum(x) > 0
        else:
            pred = self.c
        return lax.cond(
            pred,
            ft.partial(apply_ops, self.true_body, env=env),
            ft.partial(apply_ops, self.false_body, env=env),
            x,
        )


@register("cond", body=True, control=True, weight=3)
def _draw_cond(name, gen, x, depth):
    if depth >= MAX_DEPTH:
        return None
    pred = gen.choice(("s", "x", "lit"))
    t = gen.body(x, depth)
    f = gen.body(x, depth) if gen.boolean() else ()
    if t is None or f is None:
        return None
    return Cond(pred, t, f, gen.boolean() if pred == "lit" else None)


@dataclasses.dataclass(frozen=True)
class Switch:
    """`lax.switch(index, bodies, x)`; the index from `s`, from `x` or an int."""

    index: str
    bodies: tuple
    c: Any = literal(None)

    def apply(self, x, env):
        if self.index == "s":
            index = jnp.floor(jnp.nan_to_num(env.s)).astype(jnp.int32)
        elif self.index == "x":
            index = jnp.argmax(jnp.ravel(x)).astype(jnp.int32)
        else:
            index = self.c
        return lax.switch(
            index, [ft.partial(apply_ops, b, env=env) for b in self.bodies], x
        )


@register("switch", body=True, control=True, weight=3)
def _draw_switch(name, gen, x, depth):
    if depth >= MAX_DEPTH:
        return None
    bodies = [gen.body(x, depth) for _ in range(gen.integer(2, 3))]
    if any(b is None for b in bodies):
        return None
    # `argmax` of keys passes JAX's shape check but not its lowering: not from keys.
    keys = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    index = gen.choice(("s", "lit") if keys else ("s", "x", "lit"))
    return Switch(index, tuple(bodies), gen.integer(-1, 3) if index == "lit" else None)


@dataclasses.dataclass(frozen=True)
class While:
    """`lax.while_loop` for at most `n` steps of `body`; with `on_value`, the predicate
    also reads the carry (`sum(x) < 1e3`)."""

    n: int
    body: tuple
    on_value: bool

    def apply(self, x, env):
        def cond(carry):
            i, y = carry
            pred = i < self.n
            if self.on_value:
                pred = pred & (jnp.sum(y.astype(jnp.float32)) < 1e3)
            return pred

        def body(carry):
            i, y = carry
            return i + 1, apply_ops(self.body, y, env)

        return lax.while_loop(cond, body, (0, x))[1]


@register("while", body=True, control=True, weight=3)
def _draw_while(name, gen, x, depth):
    if depth >= MAX_DEPTH:
        return None
    body = gen.body(x, depth)
    return None if body is None else While(gen.integer(0, 3), body, gen.boolean())


@dataclasses.dataclass(frozen=True)
class Fori:
    """`lax.fori_loop(0, n, ...)`: static bounds (a scan) or traced (a while)."""

    n: int
    body: tuple
    traced: int | None

    def apply(self, x, env):
        upper = self.n if self.traced is None else env.extras[self.traced]
        return lax.fori_loop(0, upper, lambda i, y: apply_ops(self.body, y, env), x)


@register("fori", body=True, control=True, weight=3)
def _draw_fori(name, gen, x, depth):
    if depth >= MAX_DEPTH:
        return None
    body = gen.body(x, depth)
    if body is None:
        return None
    traced = gen.plain((), "int32", "index", 0, 4) if gen.boolean() else None
    return Fori(gen.integer(0, 3), body, traced)


@dataclasses.dataclass(frozen=True)
class Scan:
    """`lax.scan` with the running array as the carry ("carry"), as the scanned-over
    xs ("xs", along axis 0) or as a constant of the body ("const"); returns the final
    carry or the stacked ys (`ys`)."""

    role: str
    body: tuple
    length: int
    ys: bool
    reverse: bool = False

    def apply(self, x, env):
        run = ft.partial(apply_ops, self.body, env=env)
        if self.role == "carry":

            def step_carry(c, _):
                c = run(c)
                return c, c

            carry, ys = lax.scan(
                step_carry, x, length=self.length, reverse=self.reverse
            )
        elif self.role == "xs":

            def step_xs(c, xi):
                y = run(xi)
                return c + y, y

            carry, ys = lax.scan(
                step_xs, jnp.zeros(x.shape[1:], x.dtype), x, reverse=self.reverse
            )
        else:

            def step_const(c, _):
                c = run(c) + x
                return c, c

            carry, ys = lax.scan(
                step_const,
                jnp.zeros(x.shape, x.dtype),
                length=self.length,
                reverse=self.reverse,
            )
        return ys if self.ys else carry


@register("scan_carry", "scan_xs", "scan_const", body=True, control=True, weight=3)
def _draw_scan(name, gen, x, depth):
    if depth >= MAX_DEPTH:
        return None
    role = name.removeprefix("scan_")
    if role == "xs":
        if x.ndim == 0:
            return None
        body = gen.body(jax.ShapeDtypeStruct(x.shape[1:], x.dtype), depth)
    else:
        body = gen.body(x, depth)
    if body is None:
        return None
    return Scan(role, body, gen.integer(1, 3), gen.boolean(), gen.boolean())


@dataclasses.dataclass(frozen=True)
class Map:
    """`lax.map(body, x)` over axis 0."""

    body: tuple

    def apply(self, x, env):
        return lax.map(ft.partial(apply_ops, self.body, env=env), x)


@register("map", control=True, weight=2)
def _draw_map(name, gen, x, depth):
    if depth >= MAX_DEPTH or x.ndim == 0:
        return None
    body = gen.body(jax.ShapeDtypeStruct(x.shape[1:], x.dtype), depth)
    return None if body is None else Map(body)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    body: tuple
    policy: str | None

    def apply(self, x, env):
        policy = (
            None
            if self.policy is None
            else getattr(jax.checkpoint_policies, self.policy)
        )
        return jax.checkpoint(ft.partial(apply_ops, self.body, env=env), policy=policy)(
            x
        )


@register("checkpoint", body=True, control=True, weight=2)
def _draw_checkpoint(name, gen, x, depth):
    if depth >= MAX_DEPTH:
        return None
    body = gen.body(x, depth)
    policy = gen.choice(
        (None, "nothing_saveable", "dots_saveable", "everything_saveable")
    )
    return None if body is None else Checkpoint(body, policy)


@dataclasses.dataclass(frozen=True)
class NestedJit:
    """`jax.jit(body)(x)`, or the same jitted body applied twice (`twice`)."""

    body: tuple
    twice: bool

    def apply(self, x, env):
        fn = jax.jit(ft.partial(apply_ops, self.body, env=env))
        return fn(fn(x)) if self.twice else fn(x)


@register("jit", body=True, control=True, weight=3)
def _draw_jit(name, gen, x, depth):
    if depth >= MAX_DEPTH:
        return None
    body = gen.body(x, depth)
    return None if body is None else NestedJit(body, gen.boolean())


JITTED: dict[str, Callable[[Any, Any], Any]] = {
    "div": jax.jit(lambda x, c: x / c),
    "mul": jax.jit(lambda x, c: x * c),
    "rdiv": jax.jit(lambda x, c: c / x),
    "copysign": jax.jit(lambda x, c: jnp.copysign(x, c)),
    "atan2": jax.jit(lambda x, c: jnp.arctan2(c, x)),
    "max": jax.jit(lambda x, c: jnp.maximum(x, c)),
}


@dataclasses.dataclass(frozen=True)
class JitScalar:
    """A module-level jitted function called with a Python scalar (folded into the
    outer jaxpr as a literal operand of the nested `jit`)."""

    fn: str
    c: Any = literal(0.0)

    def apply(self, x, env):
        return JITTED[self.fn](x, self.c)


@register("jit_scalar", body=True, weight=2)
def _draw_jit_scalar(name, gen, x, depth):
    return JitScalar(gen.choice(tuple(JITTED)), gen.literal())


# -- custom derivatives ----------------------------------------------------------------


@jax.custom_jvp
def _cube(x):
    return x * x * x


@_cube.defjvp
def _cube_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _cube(x), 3 * x * x * t


@jax.custom_jvp
def _soft_sign(x):
    return x / (1 + jnp.abs(x))


@_soft_sign.defjvp
def _soft_sign_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # Deliberately not the true derivative: both sides must use this rule.
    return _soft_sign(x), t * 2.0


@jax.custom_vjp
def _clip_gradient(x):
    return x


def _clip_gradient_fwd(x):
    return x, None


def _clip_gradient_bwd(_, g):
    return (jnp.clip(g, -0.25, 0.25),)


_clip_gradient.defvjp(_clip_gradient_fwd, _clip_gradient_bwd)


@jax.custom_vjp
def _sin_times(x):
    return jnp.sin(x) * x


def _sin_times_fwd(x):
    return _sin_times(x), x


def _sin_times_bwd(x, g):
    return (g * (jnp.cos(x) * x + jnp.sin(x)),)


_sin_times.defvjp(_sin_times_fwd, _sin_times_bwd)


CUSTOM: dict[str, Callable[[Any], Any]] = {
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "sinc": jnp.sinc,
    "custom_jvp_cube": _cube,
    "custom_jvp_soft_sign": _soft_sign,
    "custom_vjp_clip_gradient": _clip_gradient,
    "custom_vjp_sin_times": _sin_times,
}


@dataclasses.dataclass(frozen=True)
class Custom:
    """A `jax.custom_jvp` or `jax.custom_vjp` function (from JAX or defined here)."""

    fn: str

    def apply(self, x, env):
        return CUSTOM[self.fn](x)


@register(*CUSTOM, body=True, weight=2)
def _draw_custom(name, gen, x, depth):
    return Custom(name)


# -- PRNG keys -----------------------------------------------------------------------

RANDOM: dict[str, Callable[[Any, Any], Any]] = {
    "random_uniform": lambda k, env: jax.random.uniform(k, (2,)),
    "random_normal": lambda k, env: jax.random.normal(k, (2,)),
    "random_bits": lambda k, env: jax.random.bits(k, (2,)),
    "random_randint": lambda k, env: jax.random.randint(k, (2,), -5, 5),
    "random_split": lambda k, env: jax.random.split(k, 2),
    "random_fold_in": lambda k, env: jax.random.fold_in(k, 7),
    "random_fold_in_s": lambda k, env: jax.random.fold_in(
        k, jnp.nan_to_num(env.s).astype(jnp.int32)
    ),
    "random_key_data": lambda k, env: jax.random.key_data(k),
}


@dataclasses.dataclass(frozen=True)
class Random:
    """A `jax.random` function of each key of `x` (a key array), as a user vmaps it
    over a batch of keys."""

    fn: str

    def apply(self, x, env):
        fn = lambda k: RANDOM[self.fn](k, env)
        for _ in range(x.ndim):
            fn = jax.vmap(fn)
        return fn(x)


@register(*RANDOM, body=True, weight=3, kinds=("prng",))
def _draw_random(name, gen, x, depth):
    return Random(name)


# -- the tables drawn from -------------------------------------------------------------

NAMES: tuple[str, ...] = tuple(CATALOGUE)


def names_for(kind: str) -> tuple[str, ...]:
    """The catalogue names drawn in programs on a value of builder `kind`."""
    return tuple(n for n, e in CATALOGUE.items() if e.kinds is None or kind in e.kinds)


BODY_NAMES: tuple[str, ...] = tuple(n for n, e in CATALOGUE.items() if e.body)
CONTROL_NAMES: tuple[str, ...] = tuple(n for n, e in CATALOGUE.items() if e.control)
