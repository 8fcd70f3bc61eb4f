"""Strict mode: implicit materialisation as an error or a warning.

Every materialisation quax does on its own initiative goes through
`_dispatch.implicit_materialise`, which calls `on_materialise` here first. The mode is
per thread: `quax.strict(...)` sets it for a block, `quaxify(fn, materialise=...)` for
the calls of one function. `quax.explain` listens at the same hook (`STATE.recorder`).
"""

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from ._errors import (
    _MSG_MATERIALISE,
    MaterialiseError,
    MaterialiseWarning,
    format_site,
    type_names,
)
from ._values import handler_name


Mode = Literal["error", "warn", "allow"]
MODES: tuple[str, ...] = ("error", "warn", "allow")


class _State(threading.local):
    mode: str = "allow"  # what an implicit materialisation does
    recorder: Any = None  # `quax.explain`'s recorder while it runs, else None


STATE = _State()


def check_mode(mode: Any, what: str) -> None:
    if mode not in MODES:
        raise ValueError(
            f"quax: {what} must be one of 'error', 'warn' or 'allow', got {mode!r}."
        )


@contextlib.contextmanager
def strict(mode: Mode = "error") -> Iterator[None]:
    """Turn every implicit materialisation inside the block into an error
    (`quax.MaterialiseError`, the default) or a warning (`quax.MaterialiseWarning`),
    or allow it again (`"allow"`).

    Use it to prove that a program never densifies its values:

    ```python
    with quax.strict():
        loss = quax.quaxify(loss_fn)(lora_model, x)
    ```

    It applies to the current thread, to every `quax.quaxify` call in the block
    (except those given their own `materialise=`), including nested `jax.jit`
    bodies, loops and conditionals. Like any Python state read while tracing, it is
    not seen by a program that `jax.jit` (outside `quaxify`) compiled before: put
    `jax.jit` inside the block, or use `quaxify(fn, materialise=...)`.
    """
    check_mode(mode, "quax.strict's mode")
    previous = STATE.mode
    STATE.mode = mode
    try:
        yield
    finally:
        STATE.mode = previous


@contextlib.contextmanager
def mode_for_call(mode: str | None) -> Iterator[None]:
    """`quaxify(fn, materialise=mode)`: the mode during one call (None: unchanged)."""
    if mode is None or mode == STATE.mode:
        yield
        return
    previous = STATE.mode
    STATE.mode = mode
    try:
        yield
    finally:
        STATE.mode = previous


def on_materialise(eqn: Any, x: Any, operands: Sequence[Any]) -> None:
    """Called before quax materialises the value `x` for `eqn` on its own."""
    recorder = STATE.recorder
    if recorder is not None:
        recorder.materialised(eqn, x)
    mode = STATE.mode
    if mode == "allow":
        return
    message = _MSG_MATERIALISE.format(
        prim=eqn.primitive.name,
        handler=handler_name(eqn.primitive.name),
        cls=type(x).__name__,
        types=type_names(operands),
        site=format_site(eqn.source_info),
        mode=mode,
    )
    if mode == "error":
        raise MaterialiseError(message)
    warnings.warn(message, MaterialiseWarning, stacklevel=2)
