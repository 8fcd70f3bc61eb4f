"""The few places where quax (this repository) and the Quax library differ.

Everything else in the benchmarks uses the common API: `quax.quaxify`,
`quax.ArrayValue`, `quax.lora.loraify(model, rank=..., key=...)`,
`quax.lora.LoraArray`, `quax.zero.Zero(shape, dtype)`.
"""

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
from _common import OURS

import quax


class Box(quax.ArrayValue):
    """A value with no handlers at all: every primitive that touches it materialises
    it. Used where only the library's own overhead is of interest."""

    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array


def clear_caches() -> None:
    """Forget every trace the library cached, so the next call traces and walks (or,
    for Quax, re-quaxifies nested jits) from scratch. JAX's own caches are kept, as
    for the plain model."""
    if OURS:
        from quax._walker import TraceCache

        for name, module in list(sys.modules.items()):
            if name == "quax" or name.startswith("quax."):
                for obj in list(vars(module).values()):
                    if isinstance(obj, TraceCache):
                        obj.clear()
    else:
        from quax import _primitives

        for name, obj in vars(_primitives).items():
            if name.endswith("_quax_cache") and isinstance(obj, dict):
                obj.clear()


@contextlib.contextmanager
def count_walks() -> Iterator[list[int]]:
    """Counts how many times the library walks (quaxifies) the body of a nested
    `jit`; read `box[0]` after the block. Ours: misses of the walked-`jit` cache.
    Quax: calls of `jaxpr_as_fun` on a nested jit's jaxpr, which it makes once per
    quaxified body."""
    box = [0]
    if OURS:
        from quax.handlers import _jit

        before = _jit.JIT_TRACES.misses
        try:
            yield box
        finally:
            box[0] = _jit.JIT_TRACES.misses - before
    else:
        from quax import _primitives

        real = _primitives.jexc.jaxpr_as_fun

        def counting(*args: Any, **kwargs: Any) -> Any:
            box[0] += 1
            return real(*args, **kwargs)

        _primitives.jexc.jaxpr_as_fun = counting
        try:
            yield box
        finally:
            _primitives.jexc.jaxpr_as_fun = real


# -- LoRA and Zero ---------------------------------------------------------------------


def lora_module() -> Any:
    """`quax.lora`: a module here, an attribute (`quax.examples.lora`) in Quax; None
    where the library has no LoRA yet."""
    try:
        return importlib.import_module("quax.lora")
    except ImportError:
        return getattr(quax, "lora", None)


def zero_module() -> Any:
    """`quax.zero`, as `lora_module`."""
    try:
        return importlib.import_module("quax.zero")
    except ImportError:
        return getattr(quax, "zero", None)


def have_lora() -> bool:
    return lora_module() is not None


def have_zero() -> bool:
    return zero_module() is not None


def is_lora(x: Any) -> bool:
    return isinstance(x, lora_module().LoraArray)


def loraify(model: Any, rank: int, key: Any) -> Any:
    return lora_module().loraify(model, rank=rank, key=key)


def Zero(shape: tuple[int, ...], dtype: Any) -> Any:  # noqa: N802
    return zero_module().Zero(shape, dtype)


def lora_parts(lora: Any) -> tuple[Any, Any, Any]:
    """`(w, a, b)` of a LoraArray, with `w + a @ b` its value. The frozen weight is
    read from its field, without the stop_gradient its accessor may add."""
    w = getattr(lora, "_w", None)
    if w is None:
        w = lora.w
    return w, lora.a, lora.b


def make_lora(w: Any, a: Any, b: Any) -> Any:
    """A LoraArray with exactly these `w`, `a`, `b` (rank from `a`)."""
    import jax.random as jr

    template = lora_module().LoraArray(w, rank=a.shape[-1], key=jr.key(0))
    return with_parts(template, w, a, b)


def with_parts(template: Any, w: Any, a: Any, b: Any) -> Any:
    """`template` (a LoraArray) with its `w`, `a`, `b` replaced; works under a trace."""
    field = "_w" if hasattr(template, "_w") else "w"
    return eqx.tree_at(lambda t: (getattr(t, field), t.a, t.b), template, (w, a, b))


def trainable(model: Any) -> Any:
    """A filter spec (same structure as `model`) that is True exactly at the `a` and
    `b` of every LoraArray: the parameters LoRA fine-tuning trains."""
    spec = jtu.tree_map(lambda _: False, model, is_leaf=is_lora)

    def mark(leaf_spec: Any, leaf: Any) -> Any:
        if is_lora(leaf):
            s = jtu.tree_map(lambda _: False, leaf)
            return eqx.tree_at(lambda t: (t.a, t.b), s, (True, True))
        return leaf_spec

    return jtu.tree_map(mark, spec, model, is_leaf=is_lora)


def lora_version() -> str:
    return getattr(quax, "__version__", "?")
