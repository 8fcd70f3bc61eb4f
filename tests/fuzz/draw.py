"""Drawing programs with hypothesis: `Gen` hands out operands, axes and bodies that fit
the running array's shape, and checks every drawn operation with `jax.eval_shape` on
dense arrays (an operation JAX rejects is drawn again)."""

import functools as ft
import math
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp

from .program import LITERALS, Arg, Env, Extra, Program, apply_ops


#: Control flow nests at most this deep (a body of a body of the top-level program).
MAX_DEPTH = 2
#: Draws of one operation before giving up on this position.
TRIES = 8


def aval_of(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(
        x.shape, x.dtype, weak_type=getattr(x, "weak_type", False)
    )


def same_aval(a: Any, b: Any) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


class Gen:
    """The drawing context of one program."""

    def __init__(self, data: Any, v_aval: jax.ShapeDtypeStruct, names: tuple[str, ...]):
        self.data = data
        self.v_aval = v_aval
        self.names = names  # the catalogue names this program may use
        self.extras: list[Extra] = []

    # -- primitive draws ---------------------------------------------------------------

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.data.draw(strategy, label=label)

    def choice(self, options: Any) -> Any:
        return self.draw(st.sampled_from(tuple(options)))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def boolean(self) -> bool:
        return self.draw(st.booleans())

    def literal(self) -> Any:
        return self.choice(LITERALS)

    def axis(self, ndim: int, negative: bool = True) -> int:
        axis = self.integer(0, ndim - 1)
        return axis - ndim if negative and self.boolean() else axis

    def axes(self, ndim: int) -> tuple[int, ...]:
        chosen = self.draw(st.sets(st.integers(0, ndim - 1), max_size=ndim))
        return tuple(sorted(chosen))

    def permutation(self, items: Any) -> list:
        return self.draw(st.permutations(list(items)))

    # -- plain inputs ------------------------------------------------------------------

    def plain(
        self,
        shape: tuple[int, ...],
        dtype: str = "float32",
        kind: str | None = None,
        lo: int = 0,
        hi: int = 0,
    ) -> int:
        """Register a plain input; returns its index in `env.extras`."""
        if kind is None:
            kind = self.choice(("normal", "normal", "special"))
        self.extras.append(Extra(tuple(shape), dtype, str(kind), lo, hi))
        return len(self.extras) - 1

    def indices(self, shape: tuple[int, ...], n: int, oob: bool) -> int:
        """Int indices into an axis of size `n`: negative ones too, and with `oob`
        out of bounds on both sides."""
        # An empty axis has no index in bounds: out-of-bounds ones then.
        lo, hi = (-2 * n - 1, 2 * n + 1) if oob or n == 0 else (-n, n)
        return self.plain(shape, "int32", "index", lo, hi)

    def broadcastable(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A shape that broadcasts against `shape` without changing it: the same rank
        with some axes 1, or a scalar."""
        if not shape or self.integer(0, 4) == 0:
            return ()
        return tuple(1 if self.integer(0, 2) == 0 else d for d in shape)

    def other(
        self,
        x: jax.ShapeDtypeStruct,
        kinds: tuple[str, ...] = ("x", "v", "s", "e", "e", "lit", "lit"),
    ) -> Arg:
        """The second operand of an elementwise operation on `x`."""
        options = [
            k for k in kinds if k != "v" or _broadcasts(self.v_aval.shape, x.shape)
        ]
        kind = self.choice(options)
        if kind == "e":
            return Arg("e", index=self.plain(self.broadcastable(x.shape)))
        if kind == "lit":
            return Arg("lit", lit=self.literal())
        return Arg(kind)

    # -- checking ----------------------------------------------------------------------

    def env_avals(self) -> tuple:
        return (
            self.v_aval,
            jax.ShapeDtypeStruct((), jnp.float32),
            tuple(e.aval() for e in self.extras),
        )

    def out_aval(self, ops: tuple, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        """What `ops` give on an `x` of this aval, with dense operands; raises if JAX
        rejects them."""

        def run(x, v, s, extras):
            return apply_ops(ops, x, Env(v, s, extras))

        out = jax.eval_shape(run, x, *self.env_avals())
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise TypeError(f"an operation returned {type(out)}")
        if math.prod(out.shape) > 4096:
            raise ValueError("too big")
        return out

    # -- operations ---------------------------------------------------------------------

    def op(
        self, x: jax.ShapeDtypeStruct, depth: int, names: tuple[str, ...]
    ) -> tuple[Any, jax.ShapeDtypeStruct] | None:
        """One operation on `x` from `names` that JAX accepts, and its result's aval."""
        from .ops import CATALOGUE

        for _ in range(TRIES):
            name = self.choice(_weighted(names))
            n_extras = len(self.extras)
            try:
                op = CATALOGUE[name].draw(self, x, depth)
                if op is None:
                    continue
                return op, self.out_aval((op,), x)
            except Exception:  # noqa: BLE001 -- JAX rejected the draw: draw again
                del self.extras[n_extras:]
        return None

    def body(
        self, x: jax.ShapeDtypeStruct, depth: int, min_ops: int = 1
    ) -> tuple | None:
        """1-2 operations that keep `x`'s shape and dtype (a loop or branch body)."""
        from .ops import BODY_NAMES, CONTROL_NAMES

        names = tuple(
            n
            for n in self.names
            if n in BODY_NAMES and (depth < MAX_DEPTH or n not in CONTROL_NAMES)
        )
        ops = []
        for _ in range(self.integer(min_ops, 2)):
            for _ in range(TRIES):
                drawn = self.op(x, depth + 1, names)
                if drawn is not None and same_aval(drawn[1], x):
                    ops.append(drawn[0])
                    break
        if len(ops) < min_ops:
            return None
        return tuple(ops)


@ft.lru_cache(maxsize=64)
def _weighted(names: tuple[str, ...]) -> tuple[str, ...]:
    """`names`, each repeated by its weight (structural operations, which reach the
    types' handlers in more ways, are drawn more often than elementwise ones)."""
    from .ops import CATALOGUE

    return tuple(n for n in names for _ in range(CATALOGUE[n].weight))


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """`a` broadcasts against `b` without rank promotion and without growing `b`."""
    if a == ():
        return True
    return len(a) == len(b) and all(p == q or p == 1 for p, q in zip(a, b, strict=True))


S_VALUES = (0.75, -1.25, 2.0, 0.0, -0.0, 1.0, -3.5, math.nan, math.inf)


def draw_program(
    data: Any, v_aval: jax.ShapeDtypeStruct, names: tuple[str, ...], max_ops: int = 6
) -> Program:
    """A program of 2-`max_ops` operations from `names`, on a value of aval `v_aval`."""
    # Tracer-leak checking (on in the test suite) triples the cost of drawing, whose
    # `eval_shape` checks cannot leak into quax: off while drawing.
    leaks = jax.config.values["jax_check_tracer_leaks"]
    jax.config.update("jax_check_tracer_leaks", False)
    try:
        return _draw_program(data, v_aval, names, max_ops)
    finally:
        jax.config.update("jax_check_tracer_leaks", leaks)


def _draw_program(data, v_aval, names, max_ops):
    gen = Gen(data, v_aval, names)
    n_ops = gen.integer(2, max_ops)
    s = gen.draw(st.sampled_from(S_VALUES) | st.floats(-3, 3, width=32), label="s")
    ops = []
    x = v_aval
    for _ in range(n_ops):
        drawn = gen.op(x, 0, names)
        if drawn is None:
            break
        op, x = drawn
        ops.append(op)
    seed = gen.integer(0, 2**31 - 1)
    return Program(tuple(ops), tuple(gen.extras), float(s), seed)
