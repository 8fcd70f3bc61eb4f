"""Known, reported bugs the bounded run must not trip over (each cites its entry in
/work/FUZZ_FINDINGS.md). Remove an exclusion when its fix lands.

An `Exclusion` matches a (kind, mode) pair and an operation of the program (by its
catalogue name, and optionally a predicate on the drawn operation); programs holding a
matching operation are not run for that pair.
"""

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Exclusion:
    finding: str  # the heading of the finding in FUZZ_FINDINGS.md
    kinds: tuple[str, ...] | None  # None: every builder
    modes: tuple[str, ...] | None  # None: every mode
    op: type | None = None  # the operation's class; None: any
    when: Callable[[Any], bool] | None = None  # a predicate on the operation

    def applies(self, kind: str, mode: str) -> bool:
        return (self.kinds is None or kind in self.kinds) and (
            self.modes is None or mode in self.modes
        )

    def matches(self, op: Any) -> bool:
        if self.op is not None and not isinstance(op, self.op):
            return False
        return self.when is None or bool(self.when(op))


EXCLUSIONS: list[Exclusion] = []
