"""The dispatch protocol's corner cases (DESIGN.md, steps 1-6)."""

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float, Shaped

import quax
from quax._dispatch import candidates


calls: list[str] = []


class Base(quax.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array

    def add(self, other, /, **params):
        calls.append(f"{type(self).__name__}.add")
        return type(self)(self.materialise() + _dense(other))

    def radd(self, other, /, **params):
        calls.append(f"{type(self).__name__}.radd")
        return type(self)(_dense(other) + self.materialise())


class Derived(Base):
    pass


class Other(quax.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array


def _dense(x):
    return x.materialise() if isinstance(x, quax.Value) else x


@pytest.fixture(autouse=True)
def _clear_calls():
    calls.clear()


x = jnp.arange(3.0)


def test_handler_name_mapping():
    assert quax.handler_name("add") == "add"
    assert quax.handler_name("and") == "and_"
    assert quax.handler_name("not") == "not_"
    assert quax.handler_name("while") == "while_"
    assert quax.handler_name("scatter-add") == "scatter_add"
    assert quax.handler_name("add_any") == "add_any"
    assert quax.handler_name("dot_general") == "dot_general"


def test_candidates_put_subclass_before_base():
    b, d, o = Base(x), Derived(x), Other(x)
    assert [c for c, _ in candidates([b, d])] == [Derived, Base]
    assert [c for c, _ in candidates([b, o, d])] == [Derived, Base, Other]
    assert [p for _, p in candidates([b, d])] == [1, 0]
    assert [c for c, _ in candidates([x, o, b])] == [Other, Base]


def test_operand_zero_gets_name():
    out = quax.quaxify(jnp.add)(Base(x), x)
    assert calls == ["Base.add"]
    assert isinstance(out, Base)
    np.testing.assert_allclose(out.array, 2 * x)


def test_radd_used_when_plain_array_on_left():
    out = quax.quaxify(jnp.add)(x, Base(x))
    assert calls == ["Base.radd"]
    assert isinstance(out, Base)


def test_subclass_on_right_is_asked_first_reflected():
    out = quax.quaxify(jnp.add)(Base(x), Derived(x))
    assert calls == ["Derived.radd"]
    assert isinstance(out, Derived)


def test_same_class_only_forward_name():
    quax.quaxify(jnp.add)(Base(x), Base(x))
    assert calls == ["Base.add"]


class Declines(Base):
    def add(self, other, /, **params):
        calls.append("Declines.add")
        return NotImplemented


def test_not_implemented_passes_to_next_candidate():
    out = quax.quaxify(jnp.add)(Declines(x), Base(x))
    assert calls == ["Declines.add", "Base.radd"]
    assert type(out) is Base


def test_all_decline_materialises():
    out = quax.quaxify(jnp.add)(Declines(x), x)
    assert calls == ["Declines.add"]
    assert type(out) is jax.Array or isinstance(out, jax.Array)
    np.testing.assert_allclose(out, 2 * x)


class Annotated(Base):
    def mul(self, other: Float[Array, ""], /, **params) -> "Annotated":
        calls.append("Annotated.mul")
        return Annotated(self.array * other)

    def rmul(self, other: Shaped[Array, "3"], /, **params):
        calls.append("Annotated.rmul")
        return Annotated(other * self.array)


def test_annotation_declines_operands_it_rejects():
    out = quax.quaxify(lambda v, y: v * y)(Annotated(x), x)  # not a scalar
    assert calls == []
    assert not isinstance(out, quax.Value)
    np.testing.assert_allclose(out, x * x)
    out = quax.quaxify(lambda v: v * 2.0)(Annotated(x))  # a literal: a JAX scalar
    assert calls == ["Annotated.mul"]
    assert isinstance(out, Annotated)
    np.testing.assert_allclose(out.array, 2 * x)


def test_reflected_annotation_checked_against_left_operand():
    out = quax.quaxify(lambda v, y: y * v)(Annotated(x), x)
    assert calls == ["Annotated.rmul"]
    assert isinstance(out, Annotated)


class BadReturn(Base):
    def neg(self, **params) -> "Base":
        return -self.array  # pyright: ignore[reportReturnType] -- the violation under test


def test_return_annotation_violation_is_an_error():
    with pytest.raises(quax.HandlerResultError, match=r"BadReturn\.neg.*`neg`"):
        quax.quaxify(jnp.negative)(BadReturn(x))


seen: dict[str, Any] = {}


class Recorder(Base):
    def mul(self, other, /, **params):
        seen["other_is_array"] = isinstance(other, jax.Array)
        seen["other_aval"] = jax.typeof(other)
        seen["params"] = params
        return NotImplemented


def test_literals_reach_handlers_as_jax_arrays_of_the_traced_dtype():
    # `v * 2.0` is traced as `mul v 2.0:f32[]`: the literal is already promoted.
    quax.quaxify(lambda v: v * 2.0)(Recorder(x))
    assert seen["other_is_array"]
    assert seen["other_aval"].dtype == jnp.float32 and seen["other_aval"].shape == ()
    quax.quaxify(lambda v: v * 2.0)(Recorder(x.astype(jnp.bfloat16)))
    assert seen["other_is_array"]
    assert seen["other_aval"].dtype == jnp.bfloat16


def test_params_are_forwarded_as_keywords():
    class P(Base):
        def reduce_sum(self, /, *, axes, **params):
            seen["axes"] = axes
            return jnp.sum(self.array, axis=axes)

    out = quax.quaxify(lambda v: jnp.sum(v, axis=0))(P(jnp.ones((2, 3))))
    assert seen["axes"] == (0,)
    np.testing.assert_allclose(out, 2 * jnp.ones(3))


class WithDefault(Other):
    @staticmethod
    def default(primitive, operands, params):
        calls.append(f"default:{primitive.name}")
        dense = [_dense(o) for o in operands]
        return primitive.bind(*dense, **params)


def test_default_is_asked_after_handlers():
    out = quax.quaxify(jnp.sin)(WithDefault(x))
    assert calls == ["default:sin"]
    np.testing.assert_allclose(out, jnp.sin(x))


def test_operand_beyond_position_one_reaches_only_default():
    # `select_n(pred, a, b)`: the value is operand 2 of 3, so only `default` sees it.
    pred = x > 1

    class Sel(WithDefault):
        def select_n(self, *args, **params):  # would be wrong to call: self is not pred
            raise AssertionError("select_n handler called for operand 2")

    out = quax.quaxify(lambda p, a, b: jnp.where(p, a, b))(pred, x, Sel(-x))
    assert calls == ["default:select_n"]
    np.testing.assert_allclose(out, jnp.where(pred, x, -x))


def test_default_declining_materialises():
    class Declining(Other):
        @staticmethod
        def default(primitive, operands, params):
            calls.append("declined")
            return NotImplemented

    out = quax.quaxify(jnp.cos)(Declining(x))
    assert calls == ["declined"]
    np.testing.assert_allclose(out, jnp.cos(x))


def test_class_method_for_higher_order_primitive_wins():
    class Jitted(Other):
        def jit(self, *args, jaxpr, **params):
            calls.append("Jitted.jit")
            return [jnp.zeros_like(self.array)] * len(jaxpr.out_avals)

    out = quax.quaxify(jax.jit(jnp.sin))(Jitted(x))
    assert calls == ["Jitted.jit"]
    np.testing.assert_allclose(out, jnp.zeros(3))


def test_handlers_inherited_and_overridable_by_mro():
    class Child(Base):
        def add(self, other, /, **params):
            calls.append("Child.add")
            return Child(self.array + _dense(other) + 1)

    out = quax.quaxify(jnp.add)(Child(x), x)
    assert calls == ["Child.add"]
    np.testing.assert_allclose(out.array, 2 * x + 1)
    quax.quaxify(jnp.add)(x, Child(x))
    assert calls[-1] == "Child.radd"  # inherited from Base


def test_non_function_attributes_are_not_handlers():
    with pytest.raises(TypeError, match=r"`max`"):

        class BadField(Other):  # pyright: ignore[reportUnusedClass]
            max: jax.Array

    with pytest.raises(TypeError, match=r"property `real`"):

        class BadProperty(Other):  # pyright: ignore[reportUnusedClass]
            @property
            def real(self):
                return self.array


def test_private_names_are_ignored():
    class Private(Other):
        _sin = 3  # private: not a handler, not rejected

        def _cos(self):
            raise AssertionError

    out = quax.quaxify(jnp.cos)(Private(x))
    np.testing.assert_allclose(out, jnp.cos(x))
