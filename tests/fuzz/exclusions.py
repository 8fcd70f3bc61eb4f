"""Known, reported bugs that the bounded run in `make test` must not trip over. Each
exclusion cites its entry in /work/FUZZ_FINDINGS.md (the lead's list of fuzzer
findings, routed to their owners); remove it when the fix lands.

An `Exclusion` applies to some builder kinds and modes (None: all). `names` are
catalogue names not drawn at all there; `when` is a predicate on a drawn operation
(any operation of the program, bodies included): a program holding one is not run;
`inputs` is a predicate on the whole program (its scalar `s` and extras): a program it
accepts is not run.
The mode "eager_twin" is the eager mode's second run with every signed zero flipped.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from . import ops


@dataclasses.dataclass(frozen=True)
class Exclusion:
    finding: str
    kinds: tuple[str, ...] | None
    modes: tuple[str, ...] | None
    names: tuple[str, ...] = ()
    when: Callable[[Any], bool] | None = None
    inputs: Callable[[Any], bool] | None = None

    def applies(self, kind: str, mode: str) -> bool:
        return (self.kinds is None or kind in self.kinds) and (
            self.modes is None or mode in self.modes
        )


def _fori_traced(op: Any) -> bool:
    return isinstance(op, ops.Fori) and op.traced is not None


def _nonfinite_inputs(program: Any) -> bool:
    """The program reads a traced infinity or NaN: a non-finite `s`, or an extra of
    kind "special"."""
    return not math.isfinite(program.s) or any(
        e.kind == "special" for e in program.extras
    )


# Operations whose result depends on the sign of a zero operand.
_READS_ZERO_SIGN = (
    "reciprocal",
    "rsqrt",
    "div",
    "floor_divide",
    "fmod",
    "remainder",
    "copysign",
    "signbit",
    "atan2",
    "pow",
    "nextafter",
    "jit_scalar",
)

EXCLUSIONS: list[Exclusion] = [
    Exclusion(
        "F4: Zero keeps the algebra of symbolic zeros and does not track the sign "
        "of zero (documented; see the README's 'Symbolic zeros')",
        kinds=("zero",),
        modes=None,
        names=_READS_ZERO_SIGN,
    ),
    Exclusion(
        "F7: Zero keeps the algebra of symbolic zeros: `zero * x` is zero for a traced "
        "`x` holding inf or NaN (documented; see the README's 'Symbolic zeros')",
        kinds=("zero",),
        modes=None,
        inputs=_nonfinite_inputs,
    ),
    Exclusion(
        "Q1 (harness): a gradient w.r.t. a quantized value's leaves has None for its "
        "integers, so it cannot be materialised for the comparison",
        kinds=("quantized", "lora_on_quantized"),
        modes=("grad_outside",),
    ),
    Exclusion(
        "F5: a concrete plain array becomes abstract under quaxify",
        kinds=None,
        modes=("grad_outside",),
        when=_fori_traced,
    ),
]


def excluded_names(kind: str, mode: str) -> set[str]:
    return {n for e in EXCLUSIONS if e.applies(kind, mode) for n in e.names}


def predicates(kind: str, mode: str) -> list[Callable[[Any], bool]]:
    return [e.when for e in EXCLUSIONS if e.applies(kind, mode) and e.when is not None]


def input_predicates(kind: str, mode: str) -> list[Callable[[Any], bool]]:
    return [
        e.inputs for e in EXCLUSIONS if e.applies(kind, mode) and e.inputs is not None
    ]


def twin_excluded(kind: str) -> bool:
    return any(e.applies(kind, "eager_twin") for e in EXCLUSIONS)
