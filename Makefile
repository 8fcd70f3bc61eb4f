# The two commands of the quick start: `make demo` and `make test`. Each creates the
# virtual environment .venv if it is missing and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-all demo demo-sharded lint bench clean fuzz

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extra: `make test` installs `.[test]`, `make demo` `.[demo]`, ...
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

# The fuzzer's bounded run draws from a fixed seed here, so CI is reproducible;
# `make fuzz` draws new programs every run.
test: $(VENV)/.installed-test
	FUZZ_SEED=20261129 JAX_CHECK_TRACER_LEAKS=1 JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 -q -m "not slow"

# Everything, the tests marked slow included (more types x modes, the whole wrapper
# measure, every adjoint): about twice as long as `make test`.
test-all: $(VENV)/.installed-test
	JAX_CHECK_TRACER_LEAKS=1 JAX_PLATFORMS=cpu $(PY) -m pytest -n auto -q

# The differential fuzzer alone, for as long as asked: FUZZ_EXAMPLES programs per (type,
# mode) test, on every core. Each failure prints its seed, program and a replay command;
# each test appends a line to FUZZ_LOG, whose totals are printed at the end.
# `make fuzz FUZZ_RESUME=1` keeps FUZZ_LOG and skips the tests that already passed
# FUZZ_EXAMPLES programs on the same quax/ (a run longer than a session).
# XLA's own rewrites can change IEEE results between two programs that compute the same
# thing, and quax's program and the dense one are shaped differently: XLA contracts a
# multiply and an add into one FMA (openxla/xla#41579: `q * scale - y` rounds once
# where the dense array was rounded before), and its algebraic simplifier rewrites
# `log(pow(a, b))` as `b * log(|a|)` (finite where IEEE gives NaN). The long run
# compiles without either (FMA instructions exist from AVX2 on, on x86).
FUZZ_EXAMPLES ?= 500
FUZZ_LOG ?= $(CURDIR)/fuzz-log.jsonl
FUZZ_XLA_FLAGS ?= --xla_disable_hlo_passes=algsimp $(if $(filter x86_64,$(shell uname -m)),--xla_cpu_max_isa=AVX)
fuzz: $(VENV)/.installed-test
	$(if $(FUZZ_RESUME),,rm -f $(FUZZ_LOG))
	XLA_FLAGS="$(FUZZ_XLA_FLAGS)" FUZZ_RESUME=$(FUZZ_RESUME) FUZZ_LOG=$(FUZZ_LOG) FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) JAX_CHECK_TRACER_LEAKS=1 JAX_PLATFORMS=cpu $(PY) -m pytest -n auto -q tests/test_fuzz.py; \
	status=$$?; cd tests && ../$(PY) -m fuzz.log $(FUZZ_LOG); exit $$status

demo: $(VENV)/.installed-demo
	JAX_PLATFORMS=cpu $(PY) examples/lora_finetune.py

# The sharded fine-tune of issue 11, on 8 CPU devices.
demo-sharded: $(VENV)/.installed-demo
	JAX_PLATFORMS=cpu $(PY) examples/lora_sharded.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format --check quax tests benchmarks examples
	$(VENV)/bin/ruff check quax tests benchmarks examples
	$(VENV)/bin/pyright

# `make bench BENCH_ARGS=--quick` for a fast smoke run; the Quax library's venv
# (benchmarks/.venv-quax) is created on first use.
bench: $(VENV)/.installed-demo
	JAX_PLATFORMS=cpu $(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) benchmarks/.venv-quax
