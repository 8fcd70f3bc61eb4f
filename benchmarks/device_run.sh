#!/usr/bin/env bash
# The GPU row of `make bench` and the test suite on the GPU machine's JAX, in one run
# (a lent machine has JAX preinstalled and no package index; beartype is carried as a
# wheel in .whl/). Results and logs go to $OUT (default: benchmarks/results/device).
#
#     bash benchmarks/device_run.sh
set -u -o pipefail
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import beartype" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/beartype-*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi -L
python3 - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as md, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "equinox", "jaxtyping", "beartype", "diffrax", "lineax",
             "optimistix", "flax", "optax", "hypothesis", "pytest", "pytest-xdist"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
import jax; print("devices", jax.devices())
PY
# 1. The GPU row.
(cd benchmarks && timeout 300 python3 bench_gpu.py --out "$OUT") 2>&1 | tee "$OUT/bench_gpu.log"
# 2. The suite on this JAX, on the CPU (as CI runs it), every core.
FUZZ_SEED=20261129 JAX_CHECK_TRACER_LEAKS=1 JAX_PLATFORMS=cpu timeout 270 \
    python3 -m pytest -n "$(nproc)" -q -m "not slow" -p no:benchmark \
    2>&1 | tee "$OUT/tests.log" | tail -60
