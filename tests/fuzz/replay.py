"""Replay one program printed by a failure of `tests/test_fuzz.py`."""

from typing import Any

import jax.random as jr

from . import ops, program
from .check import check


def variants(kind: str, count: int = 3) -> list[tuple[Any, Any]]:
    """The values a fuzzed test of `kind` draws from (made once per process)."""
    from builders import FUZZ_BUILDERS

    if kind not in _VARIANTS:
        _VARIANTS[kind] = [FUZZ_BUILDERS[kind](jr.key(i)) for i in range(count)]
    return _VARIANTS[kind]


_VARIANTS: dict[str, list[tuple[Any, Any]]] = {}


def parse(text: str) -> program.Program:
    namespace = {
        name: getattr(ops, name) for name in dir(ops) if not name.startswith("_")
    }
    namespace.update(
        Program=program.Program, Extra=program.Extra, nan=program.nan, inf=program.inf
    )
    return eval(text, namespace)  # noqa: S307 -- text printed by the fuzzer itself


def replay(kind: str, mode: str, text: str) -> None:
    """Run the program `text` (as printed) on `kind` in `mode`; raises on a mismatch."""
    from .exclusions import NONFINITE_DEVIATES, twin_excluded

    check(
        mode,
        parse(text),
        variants(kind),
        twin=not twin_excluded(kind),
        nonfinite_deviates=kind in NONFINITE_DEVIATES,
    )
    print("agrees")
