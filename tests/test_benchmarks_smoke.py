"""Every benchmark script imports and runs its smallest configuration, so the suite
does not rot. No timing is asserted: the figures only have to exist."""

import importlib
import pathlib
import sys

import pytest


BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))


@pytest.fixture(scope="module", autouse=True)
def bench_path():
    sys.path.insert(0, str(BENCH_DIR))
    yield
    sys.path.remove(str(BENCH_DIR))


def test_every_question_has_a_script():
    assert set(SCRIPTS) >= {
        "bench_trace",
        "bench_jit_reuse",
        "bench_scan_layers",
        "bench_dispatch_overhead",
        "bench_eager",
        "bench_lora_runtime",
        "bench_zero",
    }


@pytest.mark.parametrize("name", SCRIPTS)
def test_smallest_configuration_runs(name):
    module = importlib.import_module(name)
    res = module.run(mode="tiny")
    data = res.as_json()
    assert data["library"] == "quax"
    assert data["rows"], f"{name} produced no figures"
    for row in data["rows"]:
        assert row["value"] is not None, row
