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
