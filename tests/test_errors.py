"""Every error template in quax/_errors.py, triggered the way a user would."""

import jax
import jax.core
import jax.numpy as jnp
import pytest

import quax


class Unitful(quax.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        raise RuntimeError("Refusing to materialise Unitful.")

    def add(self, other, /, **params):
        return Unitful(self.array + other)

    radd = add


class WrongMaterialise(quax.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array[:1]


class WrongShape(quax.ArrayValue):
    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array

    def neg(self, **params):
        return self.array[:1]

    def sin(self, **params):
        return self.array.astype(jnp.int32)

    def sort(self, *others, **params):
        return self.array  # sort has multiple results: must be a sequence


def user_loss(u):
    return jnp.cumsum(u)  # the line the error must name


def test_no_handler_names_primitive_types_handlers_and_line():
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(user_loss)(Unitful(jnp.ones(3)))
    msg = str(info.value)
    assert "`cumsum`" in msg
    assert "(Unitful)" in msg
    assert "it defines: add, radd" in msg
    assert "Refusing to materialise Unitful." in msg
    assert "test_errors.py" in msg and "user_loss" in msg
    assert "To fix" in msg
    assert isinstance(info.value, NotImplementedError)


def test_no_handler_lists_both_operand_types():
    with pytest.raises(
        quax.NoHandlerError, match=r"`mul` on operands \(Unitful, Array\)"
    ):
        quax.quaxify(lambda u, x: u * x)(Unitful(jnp.ones(3)), jnp.ones(3))


def test_materialise_disagreeing_with_aval():
    with pytest.raises(
        quax.HandlerResultError,
        match=r"WrongMaterialise\.materialise\(\) returned an array of float32\[1\].*"
        r"float32\[3\]",
    ):
        quax.quaxify(jnp.sin)(WrongMaterialise(jnp.ones(3)))


def test_handler_wrong_shape():
    with pytest.raises(
        quax.HandlerResultError, match=r"WrongShape\.neg returned float32\[1\].*`neg`"
    ):
        quax.quaxify(jnp.negative)(WrongShape(jnp.ones(3)))


def test_handler_wrong_dtype():
    with pytest.raises(
        quax.HandlerResultError, match=r"WrongShape\.sin returned int32"
    ):
        quax.quaxify(lambda v: jnp.sin(v))(WrongShape(jnp.ones(3)))


def test_handler_wrong_result_count():
    with pytest.raises(quax.HandlerResultError, match=r"WrongShape\.sort returned"):
        quax.quaxify(lambda v: jax.lax.sort(v))(WrongShape(jnp.ones(3)))


def test_return_annotation_violated():
    class Annotated(WrongShape):
        def neg(self, **params) -> "Annotated":  # pyright: ignore[reportIncompatibleMethodOverride]
            return -self.array  # pyright: ignore[reportReturnType] -- under test

    with pytest.raises(quax.HandlerResultError, match=r"Annotated\.neg.*annotation"):
        quax.quaxify(jnp.negative)(Annotated(jnp.ones(3)))


def test_quaxify_of_a_non_callable():
    with pytest.raises(quax.QuaxifyTypeError, match=r"expects a callable.*got 3"):
        quax.quaxify(3)  # pyright: ignore[reportArgumentType]


def test_field_named_like_a_primitive():
    with pytest.raises(TypeError, match=r"(?s)`sign`.*primitive `sign`.*rename"):

        class Signed(WrongShape):  # pyright: ignore[reportUnusedClass]
            sign: jax.Array


def test_errors_are_catchable_as_builtins():
    assert issubclass(quax.NoHandlerError, NotImplementedError)
    assert issubclass(quax.HandlerResultError, TypeError)
    assert issubclass(quax.QuaxifyTypeError, TypeError)
    for cls in (quax.NoHandlerError, quax.HandlerResultError, quax.QuaxifyTypeError):
        assert issubclass(cls, quax.QuaxError)
