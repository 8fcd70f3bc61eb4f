import gc
import os


# Eight CPU devices for the sharding tests (tests/test_sharding.py), set before JAX
# starts its backends; a device count the user already asked for is kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import jax.random as jr
import pytest


jax.config.update("jax_check_tracer_leaks", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.key(0), 1000))
    return lambda: next(keys)


@pytest.fixture(params=["eager", "jit_outside", "jit_inside", "grad", "vmap"])
def mode(request):
    return request.param


# The measured long tail (tests/slow_tests.txt): marked `slow` here, before `-m "not
# slow"` deselects, so `make test` stays under 12 minutes on 2 cores.
_SLOW_LIST = os.path.join(os.path.dirname(__file__), "slow_tests.txt")
with open(_SLOW_LIST) as _f:
    _SLOW = frozenset(
        line.strip() for line in _f if line.strip() and not line.startswith("#")
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in _SLOW:
            item.add_marker(pytest.mark.slow)


# JAX_CHECK_TRACER_LEAKS runs a full `gc.collect()` each time a finished trace is still
# referenced (JAX's own `checkpoint` and `jit` leave some in reference cycles), and a
# full collection of this process's heap takes a quarter of a second. Freezing what
# each module starts with leaves those collections only the module's own objects.
@pytest.fixture(autouse=True, scope="module")
def _freeze_heap():
    gc.collect()
    gc.freeze()
    yield
