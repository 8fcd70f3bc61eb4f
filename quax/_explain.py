"""`quax.explain`: which handler took each equation of a quaxified call.

While an explained call runs, `_strict.STATE.recorder` holds a `_Recorder`. The walker
tells it about every jaxpr it walks (once per walk) and every equation with a value
operand (`run_eqn`, the value path); `implicit_materialise` tells it about every
materialisation. Equations with no value operand are not seen one by one (the walker's
fast path stays as it is): they are the equations of a walked jaxpr that no record
names, and are listed as `plain`. Nothing is recorded, and nothing costs anything, when
no explained call is running.
"""

import contextlib
import dataclasses
import functools as ft
from collections.abc import Callable, Iterator
from typing import Any

import jax.extend.source_info_util as source_info_util

from ._quaxify import _Quaxify, quaxify
from ._strict import STATE
from ._values import Value


@dataclasses.dataclass(frozen=True)
class ExplainRow:
    """One equation of an explained call.

    - `depth`: 0 for the quaxified function's own equations, 1 inside a nested body.
    - `path`: the enclosing equations and sub-jaxprs, e.g. `"jit(f)/cond.branches[1]"`.
    - `primitive`: the primitive's name.
    - `handler`: what took it: `"Cls.method"`, `"Cls.default"`, `"built-in"` (quax's
      handler of a higher-order primitive, whose body is listed below it),
      `"materialised"` (no handler: the values were made dense) or `"plain"` (no
      value among its operands: run as JAX runs it).
    - `operands`: the operand types of an equation that saw a value, else `""`.
    - `materialised`: the classes of the values materialised for this equation.
    - `line`: the user's line that produced the equation.
    """

    depth: int
    path: str
    primitive: str
    handler: str
    operands: str
    materialised: tuple[str, ...]
    line: str


class Explanation:
    """What `quax.explain(fn)(*args)` returns: `rows` (a list of `ExplainRow`, in
    program order, nested bodies after their equation) and `result` (what the call
    returned). Printing it shows the rows as a table."""

    def __init__(self, rows: list[ExplainRow], result: Any):
        self.rows = rows
        self.result = result

    @property
    def materialised(self) -> list[ExplainRow]:
        """The rows where quax materialised a value."""
        return [r for r in self.rows if r.materialised]

    def __str__(self) -> str:
        header = ("in", "primitive", "handler", "operands", "materialised", "line")
        table = [header] + [
            (
                r.path,
                "  " * r.depth + r.primitive,
                r.handler,
                r.operands,
                ", ".join(r.materialised),
                r.line,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        lines = []
        for row in table:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)

    __repr__ = __str__


def explain(fn: Callable[..., Any], filter_spec: Any = True) -> Callable[..., Any]:
    """`quax.explain(fn)(*args, **kwargs)` calls `quax.quaxify(fn)` on the arguments
    and returns an `Explanation`: for each equation of the call, which handler took
    it, which values were materialised, and the user's line; nested `jit`, `cond`,
    `scan`, `while`, `checkpoint` and custom-derivative bodies are listed under their
    equation, indented. `print` it for a table; `.result` is the call's result.

    The call is walked equation by equation (no compiled or cached walk is reused),
    so use it to debug, not in a hot loop. `fn` may already be quaxified (its
    `materialise=` mode then applies).
    """
    quaxed = fn if isinstance(fn, _Quaxify) else quaxify(fn, filter_spec)

    @ft.wraps(fn)
    def explained(*args: Any, **kwargs: Any) -> Explanation:
        recorder = _Recorder()
        previous = STATE.recorder
        STATE.recorder = recorder
        try:
            result = quaxed(*args, **kwargs)
        finally:
            STATE.recorder = previous
        return Explanation(recorder.rows(), result)

    return explained


# -- the recorder -----------------------------------------------------------------------


class _Recorder:
    """Records, per path of enclosing equations, the jaxprs walked there and what
    took each equation with a value operand. Equations are keyed by identity (the
    recorder keeps them alive), with their path: one jaxpr (a cached `jnp` function's)
    may be walked at several places."""

    def __init__(self) -> None:
        self._stack: list[Any] = []  # the equations being dispatched, outermost first
        self._walks: dict[tuple[int, ...], list[Any]] = {}
        self._took: dict[tuple[tuple[int, ...], int], tuple[str, str]] = {}
        self._dense: dict[tuple[tuple[int, ...], int], list[str]] = {}
        self._alive: list[Any] = []

    def _path(self) -> tuple[int, ...]:
        return tuple(id(e) for e in self._stack)

    def walking(self, jaxpr: Any) -> None:
        walks = self._walks.setdefault(self._path(), [])
        if not any(j is jaxpr for j in walks):
            walks.append(jaxpr)
            self._alive.append(jaxpr)

    @contextlib.contextmanager
    def equation(self, eqn: Any, invals: list[Any]) -> Iterator[Callable[[str], None]]:
        key = (self._path(), id(eqn))
        self._alive.append(eqn)
        operands = ", ".join(_describe(x) for x in invals)

        def took(where: str) -> None:
            self._took[key] = (where, operands)

        self._stack.append(eqn)
        try:
            yield took
        finally:
            self._stack.pop()

    def materialised(self, eqn: Any, x: Any) -> None:
        stack = self._stack
        path = self._path()[:-1] if stack and stack[-1] is eqn else self._path()
        names = self._dense.setdefault((path, id(eqn)), [])
        if type(x).__name__ not in names:
            names.append(type(x).__name__)

    def rows(self) -> list[ExplainRow]:
        out: list[ExplainRow] = []
        self._rows((), None, "", 0, out)
        return out

    def _rows(self, path: tuple[int, ...], parent: Any, label: str, depth: int, out):
        for jaxpr in self._walks.get(path, ()):
            where = label
            if parent is not None:
                where = f"{label}.{_param_name(parent, jaxpr)}"
            for eqn in jaxpr.eqns:
                key = (path, id(eqn))
                handler, operands = self._took.get(key, ("plain", ""))
                out.append(
                    ExplainRow(
                        depth=depth,
                        path=where,
                        primitive=eqn.primitive.name,
                        handler=handler,
                        operands=operands,
                        materialised=tuple(self._dense.get(key, ())),
                        line=_line(eqn),
                    )
                )
                inner = (*path, id(eqn))
                if inner in self._walks:
                    name = _eqn_label(eqn)
                    inner_label = f"{where}/{name}" if where else name
                    self._rows(inner, eqn, inner_label, depth + 1, out)


def _describe(x: Any) -> str:
    if isinstance(x, Value):
        return type(x).__name__
    aval = getattr(x, "aval", None)
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if aval is not None:
        shape, dtype = getattr(aval, "shape", shape), getattr(aval, "dtype", dtype)
    if shape is None or dtype is None:
        return type(x).__name__
    return f"{dtype}{list(shape)}"


def _eqn_label(eqn: Any) -> str:
    name = eqn.params.get("name")
    return (
        f"{eqn.primitive.name}({name})" if isinstance(name, str) else eqn.primitive.name
    )


def _param_name(eqn: Any, jaxpr: Any) -> str:
    """The parameter of `eqn` holding the walked `jaxpr` (`branches[1]`,
    `body_jaxpr`, ...); `body` when quax walked a jaxpr of its own making."""
    for name, param in eqn.params.items():
        items = param if isinstance(param, tuple | list) else (param,)
        for i, item in enumerate(items):
            if item is jaxpr or getattr(item, "jaxpr", None) is jaxpr:
                return f"{name}[{i}]" if isinstance(param, tuple | list) else name
    return "body"


def _line(eqn: Any) -> str:
    try:
        summary = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 -- a best-effort location must never raise
        return ""
    if summary.startswith("<"):
        return ""
    _, sep, rest = summary.partition("site-packages/")
    return rest if sep else summary
