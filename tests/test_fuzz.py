"""The differential fuzzer: random programs on every builder's value, through quax and
on dense arrays, in every mode (see `tests/fuzz/__init__.py`).

`FUZZ_EXAMPLES` programs per (type, mode) test: default 1, which keeps the bounded run
in `make test` near a minute of CPU; `make fuzz` runs 500. `FUZZ_SEED` fixes the seed
(otherwise random, and printed with every failure). With `FUZZ_RESUME=1`, a test that
already passed `FUZZ_EXAMPLES` programs on the same `quax/` (per `FUZZ_LOG`) is skipped:
a long run can go on in a later session. `FUZZ_SHRINK=0` reports a failure
as drawn, without hypothesis's shrinking (which recompiles each candidate and may take
minutes). `make fuzz` also compiles without FMA contraction and XLA's algebraic
simplifier (`FUZZ_XLA_FLAGS` in the Makefile: compiler rewrites that change IEEE
results between differently shaped programs); the bounded run keeps JAX's defaults.
"""

import gc
import math
import os
import random
import time
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
from builders import FUZZ_BUILDERS
from fuzz.check import MODES, check
from fuzz.draw import aval_of, draw_program
from fuzz.exclusions import (
    NONFINITE_DEVIATES,
    excluded_names,
    predicates,
    twin_excluded,
)
from fuzz.log import passed_before, record
from fuzz.ops import names_for
from fuzz.program import iter_ops
from fuzz.replay import variants


# Programs are slow to run (compiles) and often redrawn (exclusions, rejected draws).
HEALTH_CHECKS = [
    hypothesis.HealthCheck.too_slow,
    hypothesis.HealthCheck.filter_too_much,
    hypothesis.HealthCheck.data_too_large,
    hypothesis.HealthCheck.large_base_example,
]
PHASES = [
    p
    for p in hypothesis.Phase
    if os.environ.get("FUZZ_SHRINK", "1") != "0" or p != hypothesis.Phase.shrink
]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1"))


def _seed() -> int:
    fixed = os.environ.get("FUZZ_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(FUZZ_BUILDERS))
def test_fuzz(kind, mode):
    if os.environ.get("FUZZ_RESUME"):
        earlier = passed_before(kind, mode, EXAMPLES)
        if earlier is not None:
            pytest.skip(
                f"passed {earlier['examples']} programs on this quax/ in an earlier "
                f"run (commit {earlier['commit']}, seed {earlier['seed']})"
            )
    values = variants(kind)
    v_aval = aval_of(values[0][1])
    skipped = excluded_names(kind, mode)
    names = tuple(n for n in names_for(kind) if n not in skipped)
    rejects = predicates(kind, mode)
    seed = _seed()
    ran = [0]
    # JAX_CHECK_TRACER_LEAKS runs a full `gc.collect()` whenever a finished trace is
    # still referenced (JAX's `checkpoint` and `jit` keep some in reference cycles), and
    # a full collection of this process's heap takes a quarter of a second. Freezing
    # what exists now leaves each collection only this test's objects to scan.
    gc.collect()
    gc.freeze()

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=HEALTH_CHECKS,
        phases=PHASES,
    )
    @hypothesis.given(st.data())
    def run(data):
        program = draw_program(data, v_aval, names)
        if any(reject(op) for op in iter_ops(program.ops) for reject in rejects):
            hypothesis.reject()
        hypothesis.note(f"program ({kind}, {mode}):\n{program.text()}")
        hypothesis.note(
            'replay: cd tests && python -c "import fuzz; fuzz.replay('
            f"{kind!r}, {mode!r}, '''{program.text()}''')\""
        )
        ran[0] += 1
        check(
            mode,
            program,
            values,
            twin=not twin_excluded(kind),
            nonfinite_deviates=kind in NONFINITE_DEVIATES,
        )

    start = time.perf_counter()
    outcome = "passed"
    try:
        run()
    except BaseException as err:
        first = (str(err).splitlines() or [""])[0]
        outcome = f"{type(err).__name__}: {first[:200]}"
        flags = os.environ.get("XLA_FLAGS", "")
        err.add_note(
            f"reproduce: XLA_FLAGS='{flags}' FUZZ_SEED={seed} FUZZ_EXAMPLES={EXAMPLES} "
            f"python -m pytest tests/test_fuzz.py -p no:xdist "
            f"-k 'test_fuzz[{kind}-{mode}]'"
        )
        raise
    finally:
        record(
            kind=kind,
            mode=mode,
            examples=ran[0],
            seconds=round(time.perf_counter() - start, 2),
            seed=seed,
            outcome=outcome,
            xla_flags=os.environ.get("XLA_FLAGS", ""),
        )


# -- the judge itself -------------------------------------------------------------------


def _zero_take_program(s: float) -> Any:
    from fuzz.replay import parse

    return parse(
        f"Program(s={s!r}, seed=0, extras=(Extra(shape=(2,), dtype='int32', "
        "kind='index', lo=5, hi=6),), ops=("
        "Take(idx=0, axis=0, mode='fill'), Binary(fn='mul', "
        "other=Arg(kind='s', index=0, lit=None), swap=False)))"
    )


def test_nonfinite_excuse_needs_an_earlier_infinity():
    """A wrong fill value (a NaN that the differing operation itself makes, issue 8's
    `Zero` gather) is never excused; a difference after an infinite input is."""
    from fuzz.check import ValueMismatch, _nonfinite_before

    values = variants("zero")
    finite = _zero_take_program(2.0)
    assert not _nonfinite_before("eager", finite, values, ValueMismatch("", 0))
    # The take's NaN comes before output 1 (the product): excused there.
    assert _nonfinite_before("eager", finite, values, ValueMismatch("", 1))
    assert _nonfinite_before(
        "jit_inside", _zero_take_program(math.inf), values, ValueMismatch("", 0)
    )
