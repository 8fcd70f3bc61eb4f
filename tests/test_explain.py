"""`quax.explain`: which handler took each equation, what was materialised, where."""

import equinox as eqx
import jax
import jax.numpy as jnp
from builders import Ruleless

import quax
from quax.zero import Zero


def _program(z, r, x):
    y = jnp.sin(z) * x + jnp.sum(r)  # Zero.sin, Zero.mul, materialised reduce_sum
    y = jax.lax.cond(x[0] > 0, lambda a: a + 1, lambda a: a * r, y)
    y = jax.jit(lambda a: a * z)(y)
    return jax.lax.scan(lambda c, _: (c + r, None), y, length=2)[0]


def _args():
    return Zero((3,), jnp.float32), Ruleless(jnp.arange(3.0)), jnp.ones(3)


def test_explain_rows_and_result():
    explanation = quax.explain(_program)(*_args())
    assert (explanation.result == quax.quaxify(_program)(*_args())).all()
    rows = explanation.rows
    took = [(r.depth, r.path, r.primitive, r.handler) for r in rows]
    assert (0, "", "sin", "Zero.sin") in took
    assert (0, "", "mul", "Zero.mul") in took
    assert (0, "", "reduce_sum", "materialised") in took
    assert (0, "", "cond", "built-in") in took
    assert (1, "cond.branches[0]", "mul", "materialised") in took
    assert (1, "cond.branches[1]", "add", "plain") in took
    assert (0, "", "jit", "built-in") in took
    assert (1, "jit(<lambda>).jaxpr", "mul", "Zero.rmul") in took
    assert (1, "scan.jaxpr", "add", "materialised") in took
    assert any(r.handler == "plain" and r.depth == 0 for r in rows)  # `x[0] > 0`
    dense = {(r.primitive, r.materialised) for r in explanation.materialised}
    assert ("reduce_sum", ("Ruleless",)) in dense
    (summed,) = [r for r in rows if r.primitive == "reduce_sum"]
    assert summed.line.startswith(__file__) and "_program" in summed.line
    assert summed.operands == "Ruleless"
    # Nested bodies come right after their equation, in program order.
    i = took.index((0, "", "cond", "built-in"))
    assert took[i + 1][1].startswith("cond.branches")


def test_explain_prints_a_table():
    text = str(quax.explain(_program)(*_args()))
    header, rule, *lines = text.splitlines()
    assert header.split() == [
        "in",
        "primitive",
        "handler",
        "operands",
        "materialised",
        "line",
    ]
    assert set(rule) == {"-"}
    assert any("Zero.sin" in line for line in lines)
    assert repr(quax.explain(_program)(*_args())) == text


def test_explain_lora():
    linear = eqx.nn.Linear(4, 2, key=jax.random.key(0))
    model = quax.lora.loraify(linear, rank=2, key=jax.random.key(1))
    explanation = quax.explain(lambda m, x: jax.vmap(m)(x))(model, jnp.ones((3, 4)))
    handlers = [r.handler for r in explanation.rows if r.primitive == "dot_general"]
    assert handlers == ["LoraArray.dot_general"]
    assert not explanation.materialised


def test_explain_leaves_no_trace_and_walks_cached_bodies():
    f = quax.quaxify(_program)
    f(*_args())  # fills the trace and nested-jit caches
    explanation = quax.explain(f)(*_args())
    assert any(r.path.startswith("jit") for r in explanation.rows)
    assert quax._strict.STATE.recorder is None
