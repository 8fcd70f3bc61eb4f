"""Known, reported bugs that the bounded run in `make test` must not trip over. Each
exclusion cites its entry in /work/FUZZ_FINDINGS.md (the lead's list of fuzzer
findings, routed to their owners); remove it when the fix lands.

An `Exclusion` applies to some builder kinds and modes (None: all). `names` are
catalogue names not drawn at all there; `when` is a predicate on a drawn operation
(any operation of the program, bodies included): a program holding one is not run.
`NONFINITE_DEVIATES` lists the types whose numbers are allowed to differ once an
infinity or NaN is about (a documented deviation, not an exclusion: see `check`).
The mode "eager_twin" is the eager mode's second run with every signed zero flipped.
"""

import dataclasses
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

    def applies(self, kind: str, mode: str) -> bool:
        return (self.kinds is None or kind in self.kinds) and (
            self.modes is None or mode in self.modes
        )


def _fori_traced(op: Any) -> bool:
    return isinstance(op, ops.Fori) and op.traced is not None


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
        "F12: a BCOO's unstored elements and a structured matrix's zeros off its "
        "band are exact +0: `-A` keeps them +0 where the dense array has -0 (as in "
        "jax.experimental.sparse; README 'Sparse arrays')",
        kinds=("sparse", "tridiagonal"),
        modes=None,
        names=_READS_ZERO_SIGN,
    ),
    Exclusion(
        "F12, through derivatives: those of `sqrt` and `log` at zero are +-inf by "
        "the sign of the zero",
        kinds=("sparse", "tridiagonal"),
        modes=("grad_outside", "grad_inside"),
        names=("sqrt", "log"),
    ),
    Exclusion(
        "F7, through derivatives: those of `sqrt`, `cbrt` and `log` at zero are "
        "infinite, and a `Zero` keeps the algebra of symbolic zeros (`0 * inf` is 0) "
        "where the dense gradient is `0 * inf = nan`, as JAX's own symbolic zeros in "
        "autodiff do (README 'Symbolic zeros')",
        kinds=("zero",),
        modes=("grad_outside", "grad_inside"),
        names=("sqrt", "cbrt", "log"),
    ),
    Exclusion(
        "F5: a concrete plain array becomes abstract under quaxify",
        kinds=None,
        modes=("grad_outside",),
        when=_fori_traced,
    ),
]


#: Types whose numbers may differ from the dense program's once an infinity or NaN
#: is about: `check` excuses a difference there (only when the infinity or NaN came
#: before the operation that differs). Each is documented in the README.
NONFINITE_DEVIATES: dict[str, str] = {
    "zero": "F7: `zero * x` is zero for a traced x holding inf or NaN "
    "(README 'Symbolic zeros')",
    "sparse": "F8: a BCOO's unstored elements are exact zeros: `0 * inf` is 0 "
    "(README 'Sparse arrays')",
    "tridiagonal": "F8: a structured matrix's zeros off its band are exact zeros "
    "(README 'Structured matrices')",
    "lora": "F9: `(w + a b) x` is computed as `w x + a (b x)`: an inf in x can give "
    "`inf - inf` (NaN) where the merged weight gives inf (README 'LoRA')",
    "lora_on_quantized": "F9, as for lora",
}


#: Types for which quax may return a result where the dense program raises one of
#: JAX's own errors (quoted in part): the type's algebra removes what JAX refuses.
#: Each is documented in the README.
MORE_DEFINED: dict[str, tuple[str, str]] = {
    "Zero": (
        "Reverse-mode differentiation does not work for lax.while_loop",
        "F17: `zero * s` is a Zero whatever `s` is, so a loop carrying it does not "
        "depend on `s` and needs no reverse-mode derivative, where the dense "
        "`zeros * s` does (README 'Symbolic zeros')",
    ),
}


def excluded_names(kind: str, mode: str) -> set[str]:
    return {n for e in EXCLUSIONS if e.applies(kind, mode) for n in e.names}


def predicates(kind: str, mode: str) -> list[Callable[[Any], bool]]:
    return [e.when for e in EXCLUSIONS if e.applies(kind, mode) and e.when is not None]


def twin_excluded(kind: str) -> bool:
    return any(e.applies(kind, "eager_twin") for e in EXCLUSIONS)
