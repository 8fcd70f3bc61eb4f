# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	JAX_CHECK_TRACER_LEAKS=1 JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 -q

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) examples/lora_finetune.py

lint: $(STAMP)
	$(VENV)/bin/ruff format --check quax tests benchmarks examples
	$(VENV)/bin/ruff check quax tests benchmarks examples
	$(VENV)/bin/pyright

# `make bench BENCH_ARGS=--quick` for a fast smoke run; the Quax library's venv
# (benchmarks/.venv-quax) is created on first use.
bench: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) benchmarks/.venv-quax
