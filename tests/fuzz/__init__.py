"""A differential fuzzer for quax (`tests/test_fuzz.py`).

Random programs of 2-6 operations are drawn with hypothesis from a catalogue
(`fuzz.ops.CATALOGUE`: elementwise unary and binary operations with broadcasting and
Python scalars such as -0.0, NaN and inf; reductions; reshapes and transposes;
`dot_general` with random dimension numbers; indexing, gathers in every mode and `.at[]`
updates; dynamic slices; concatenate/stack/split; where, sort, clip; cond, switch, while,
fori, scan (the value as carry, xs or constant), map, checkpoint, nested jit;
`custom_jvp` and `custom_vjp` functions). A program starts from a value made by a
builder of `tests/builders.py` (every entry of `FUZZ_BUILDERS`: each type added there
is fuzzed automatically) and returns every intermediate result. Only operations JAX
accepts on the dense array are drawn, so a program on PRNG keys (`prng`) holds the
structural operations JAX allows on typed keys and the `jax.random` functions of
`fuzz.ops.RANDOM` (drawn for keys only); keys are compared by their bits. A quantity
(`units`) never materialises: it is compared by its numbers in base units
(`builders.numbers`), and a `quax.units.UnitError` for a formula that mixes units is a
deliberate refusal. It runs through
`quax.quaxify` and on the value's dense array, in each of `fuzz.check.MODES` (eager,
under `jax.jit`, `jax.grad` and `jax.vmap`, outside and inside `quaxify`), and the two
must agree: shapes, dtypes and weak types exactly, values within a tolerance for the
dtype, NaNs at the same places, infinities with the same sign. quax's own error
(`quax.QuaxError`, not `HandlerResultError` or an internal error) for a type that will not
materialise is a deliberate refusal, not a failure; so is any error quax raises for a
program the dense side cannot run either (JAX's own errors differ between the two sides,
say for a symbolic zero tangent), unless it is quax's internal error or a handler's bad
result.

Running:

    make fuzz                                # FUZZ_EXAMPLES=500 per (type, mode), -n auto
    FUZZ_EXAMPLES=20 pytest tests/test_fuzz.py -k "lora and eager"

`make test` runs a bounded run (`FUZZ_EXAMPLES` defaults to 1 program per test, a
new random one each run). `FUZZ_SHRINK=0` skips hypothesis's shrinking of a failure.

Reproducing a failure: the failure message prints the program as text, the seed and
the command to rerun it (`FUZZ_SEED=<seed> pytest tests/test_fuzz.py -k <test id>`
with the same `FUZZ_EXAMPLES`), and a one-liner that replays only that program:

    cd tests && python -c "import fuzz; fuzz.replay('lora', 'eager', '''Program(...)''')"

Known bugs and documented deviations are excluded, each by name, in
`fuzz/exclusions.py`.

A record of each run: with `FUZZ_LOG=<file>` (`make fuzz` sets `fuzz-log.jsonl`) each
(type, mode) test appends one JSON line (examples run, seconds, seed, outcome), and
`python -m fuzz.log <file>` (from `tests/`) prints the totals: how many examples, over
how many tests, how long, which failed.
"""

from .replay import replay as replay
