"""Dispatch protocol version 2: overloads, any-position handlers, `not_handler`, and
handlers whose signature cannot take their primitive's parameters."""

import warnings
from typing import Any

import jax
import jax.core
import jax.extend.core
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from builders import Ruleless
from jaxtyping import Array, Float, Shaped

import quax
from quax._dispatch import defined_handlers
from quax._table import PARAMLESS


calls: list[str] = []


@pytest.fixture(autouse=True)
def _clear_calls():
    calls.clear()


def _dense(x: Any) -> Any:
    return x.array if isinstance(x, Box) else x


class Box(Ruleless):
    """A plain array in a box, materialising to it."""


class Sealed(Box):
    """A box that refuses to materialise."""

    def materialise(self):
        raise RuntimeError("Sealed never materialises.")


x3 = jnp.arange(1.0, 4.0)


# -- 1. overloads ---------------------------------------------------------------------


class Overloaded(Box):
    @quax.handler("mul", "rmul")
    def _mul_scalar(self, other: Float[Array, ""], /, **params):
        calls.append("scalar")
        return Overloaded(self.array * other)

    @quax.handler("mul")
    def _mul_box(self, other: Box, /, **params):
        calls.append("box")
        return Overloaded(self.array * other.array)

    @quax.handler("mul")
    def _mul_any(self, other, /, **params):
        calls.append("any")
        return NotImplemented


def test_overloads_tried_in_definition_order():
    out = quax.quaxify(lambda v: v * 2.0)(Overloaded(x3))
    assert calls == ["scalar"] and isinstance(out, Overloaded)
    np.testing.assert_allclose(out.array, 2 * x3)
    calls.clear()
    out = quax.quaxify(lambda v: 3.0 * v)(Overloaded(x3))  # the reflected name
    assert calls == ["scalar"] and isinstance(out, Overloaded)
    calls.clear()
    out = quax.quaxify(lambda v, w: v * w)(Overloaded(x3), Box(x3))
    assert calls == ["box"] and isinstance(out, Overloaded)
    np.testing.assert_allclose(out.array, x3 * x3)


def test_annotation_and_not_implemented_decline_to_the_next_overload():
    # A vector: `_mul_scalar` and `_mul_box` decline by annotation, `_mul_any` by
    # returning NotImplemented, so quax materialises.
    out = quax.quaxify(lambda v, y: v * y)(Overloaded(x3), x3)
    assert calls == ["any"]
    assert not isinstance(out, quax.Value)
    np.testing.assert_allclose(out, x3 * x3)


class NotImplementedFirst(Box):
    @quax.handler("mul")
    def _mul_never(self, other: Float[Array, ""], /, **params):
        calls.append("never")
        return NotImplemented

    def mul(self, other, /, **params):  # an implicit handler: an overload here
        calls.append("mul")
        return NotImplementedFirst(self.array * other)


def test_not_implemented_passes_to_the_next_overload_and_implicit_counts():
    out = quax.quaxify(lambda v: v * 2.0)(NotImplementedFirst(x3))
    assert calls == ["never", "mul"]
    assert isinstance(out, NotImplementedFirst)
    np.testing.assert_allclose(out.array, 2 * x3)
    assert "mul" in defined_handlers(NotImplementedFirst)


class Base(Box):
    @quax.handler("mul")
    def _mul_base(self, other, /, **params):
        calls.append("Base._mul_base")
        return type(self)(self.array * _dense(other))

    def sin(self, **params):
        calls.append("Base.sin")
        return type(self)(jnp.sin(self.array))


class Derived(Base):
    @quax.handler("mul")
    def _mul_scalar(self, other: Shaped[Array, ""], /, **params):
        calls.append("Derived._mul_scalar")
        return Derived(self.array * other)


class Overrides(Base):
    def _mul_base(self, other, /, **params):  # replaces Base's, keeps its registration
        calls.append("Overrides._mul_base")
        return Overrides(self.array * _dense(other) + 0.0)

    def sin(self, **params):
        calls.append("Overrides.sin")
        return NotImplemented


def test_subclass_overloads_before_base_overloads():
    quax.quaxify(lambda v: v * 2.0)(Derived(x3))
    assert calls == ["Derived._mul_scalar"]
    calls.clear()
    out = quax.quaxify(lambda v, y: v * y)(Derived(x3), x3)
    assert calls == ["Base._mul_base"] and isinstance(out, Derived)


def test_override_by_attribute_name_replaces_the_base_handler():
    out = quax.quaxify(lambda v: v * 2.0)(Overrides(x3))
    assert calls == ["Overrides._mul_base"] and isinstance(out, Overrides)
    calls.clear()
    # Overrides.sin declines; Base.sin is replaced, not asked: materialised.
    out = quax.quaxify(jnp.sin)(Overrides(x3))
    assert calls == ["Overrides.sin"]
    assert not isinstance(out, quax.Value)
    np.testing.assert_allclose(out, jnp.sin(x3))


def test_unreachable_overload_is_an_error_at_class_creation():
    with pytest.raises(TypeError, match=r"Bad\._mul_later can never run") as info:

        class Bad(Box):
            def mul(self, other, /, **params):
                return NotImplemented

            @quax.handler("mul")
            def _mul_later(self, other: Float[Array, ""], /, **params):
                return NotImplemented

    assert "Bad.mul" in str(info.value) and "definition order" in str(info.value)
    with pytest.raises(TypeError, match="can never run"):

        class BadAll(Box):
            @quax.handler("select_n", operands="all")
            def _first(*operands, **params):
                return NotImplemented

            @quax.handler("select_n", operands="all")
            def _second(pred, *cases: Box, **params):
                return NotImplemented


def test_a_subclass_catch_all_does_not_make_base_overloads_unreachable():
    class Sub(Derived):
        def mul(self, other, /, **params):
            calls.append("Sub.mul")
            return NotImplemented

    quax.quaxify(lambda v: v * 2.0)(Sub(x3))
    assert calls == ["Sub.mul", "Derived._mul_scalar"]


def test_handler_decorator_rejects_bad_arguments():
    with pytest.raises(TypeError, match="handler names as strings"):
        quax.handler()
    with pytest.raises(ValueError, match="'self' or 'all'"):
        quax.handler("mul", operands="other")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="reflected handler name"):
        quax.handler("rmul", operands="all")


# -- 2. any-position handlers --------------------------------------------------------


class Anywhere(Sealed):
    @quax.handler("select_n", operands="all")
    def _select_n(pred: Any, *cases, **params):
        calls.append("select_n")
        dense = [_dense(c) for c in cases]
        return Anywhere(lax.select_n(pred, *dense))

    @quax.handler("clamp", operands="all")
    def _clamp(lo: Any, operand, hi, **params):
        calls.append("clamp")
        return Anywhere(lax.clamp(_dense(lo), _dense(operand), _dense(hi)))

    @quax.handler("concatenate", operands="all")
    def _concatenate(*operands: Any, **params):
        calls.append("concatenate")
        return Anywhere(lax.concatenate([_dense(o) for o in operands], **params))

    @quax.handler("dynamic_update_slice", operands="all")
    def _dus(operand: Any, update, *indices, **params):
        calls.append("dynamic_update_slice")
        dense = [_dense(i) for i in indices]
        return Anywhere(
            lax.dynamic_update_slice(
                _dense(operand), _dense(update), dense, allow_negative_indices=False
            )
        )


def _check_anywhere(fn, args, expected_calls):
    dense_args = [_dense(a) for a in args]
    expected = fn(*dense_args)
    for f in (quax.quaxify(fn), jax.jit(quax.quaxify(fn))):
        calls.clear()
        out = f(*args)
        assert isinstance(out, Anywhere), type(out)
        if expected_calls is not None:
            assert calls == expected_calls
        np.testing.assert_allclose(out.array, expected)


@pytest.mark.parametrize("position", [1, 2])
def test_any_position_select_n(position):
    pred = jnp.array([True, False, True])
    cases = [x3, 10 * x3]
    cases[position - 1] = Anywhere(cases[position - 1])
    _check_anywhere(lambda p, a, b: lax.select_n(p, a, b), [pred, *cases], ["select_n"])


def test_any_position_select_n_through_where():
    pred = jnp.array([True, False, True])
    _check_anywhere(
        # `jnp.where` is a nested jit, walked once: the handler runs once in all.
        lambda p, a: jnp.where(p, a, 0.0),
        [pred, Anywhere(x3)],
        None,
    )


@pytest.mark.parametrize("position", [1, 2])
def test_any_position_clamp(position):
    args: list[Any] = [jnp.full(3, 1.5), x3, jnp.full(3, 2.5)]
    args[position] = Anywhere(args[position])
    _check_anywhere(lambda lo, v, hi: lax.clamp(lo, v, hi), args, ["clamp"])


@pytest.mark.parametrize("position", [1, 2])
def test_any_position_concatenate(position):
    args: list[Any] = [x3, 2 * x3, 3 * x3]
    args[position] = Anywhere(args[position])
    _check_anywhere(lambda *a: jnp.concatenate(a), args, ["concatenate"])


@pytest.mark.parametrize("position", [1, 2])
def test_any_position_dynamic_update_slice(position):
    args: list[Any] = [jnp.zeros(5), x3, jnp.array(1)]
    args[position] = Anywhere(args[position])
    _check_anywhere(
        lambda o, u, i: lax.dynamic_update_slice(
            o, u, (i,), allow_negative_indices=False
        ),
        args,
        ["dynamic_update_slice"],
    )


class PositionalThenAnywhere(Box):
    def sin(self, **params):
        calls.append("sin")
        return NotImplemented

    @quax.handler("sin", operands="all")
    def _sin_all(operand, **params):
        calls.append("sin (all)")
        return PositionalThenAnywhere(jnp.sin(operand.array))


def test_any_position_handlers_come_after_the_positional_ones():
    out = quax.quaxify(jnp.sin)(PositionalThenAnywhere(x3))
    assert calls == ["sin", "sin (all)"]
    assert isinstance(out, PositionalThenAnywhere)


class ScanAnywhere(Box):
    @quax.handler("scan", operands="all")
    def _scan(*operands, **params):
        calls.append(
            "scan: "
            + ",".join(type(o).__name__ for o in operands if isinstance(o, Box))
        )
        return lax.scan_p.bind(*[_dense(o) for o in operands], **params)


def test_any_position_scan_handler_is_asked_before_quax_scan_handler():
    def f(a, b, xs):
        def body(carry, x):
            c0, c1 = carry
            return (c0 + x, c1 * 2.0), c0 * x

        return lax.scan(body, (a, b), xs)

    xs = ScanAnywhere(jnp.arange(6.0).reshape(3, 2))
    out = quax.quaxify(f)(jnp.ones(2), jnp.ones(2), xs)
    assert calls == ["scan: ScanAnywhere"]
    expected = f(jnp.ones(2), jnp.ones(2), xs.array)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want)


class SelectAtZero(Sealed):
    def select_n(self, *cases, **params):
        return NotImplemented


@pytest.mark.parametrize("position", [1, 2])
def test_no_handler_message_names_the_position(position):
    args: list[Any] = [jnp.array([True, False, True]), x3, x3]
    args[position] = SelectAtZero(x3)
    with pytest.raises(quax.NoHandlerError) as info:
        quax.quaxify(lambda p, a, b: lax.select_n(p, a, b))(*args)
    msg = str(info.value)
    assert f"at operand position {position} of `select_n`" in msg
    assert "only ever sees a value at operand 0" in msg
    assert '@quax.handler("select_n", operands="all")' in msg
    assert "defines no `select_n` handler" not in msg


# -- 3. plain methods with primitive names, and handler signatures ----------------------


class WithPlainMethods(Sealed):
    @quax.not_handler
    def split(self, num: int) -> list[jax.Array]:
        return jnp.split(self.array, num)

    @quax.not_handler
    @property
    def sign(self) -> str:
        return "+"

    def neg(self, **params):
        return WithPlainMethods(-self.array)


def test_not_handler_is_not_dispatched_to_nor_listed():
    v = WithPlainMethods(jnp.arange(4.0))
    assert [a.tolist() for a in v.split(2)] == [[0.0, 1.0], [2.0, 3.0]]
    assert v.sign == "+"
    assert defined_handlers(WithPlainMethods) == ["neg"]
    with pytest.raises(quax.NoHandlerError, match=r"it defines: neg\)"):
        quax.quaxify(lambda v: jnp.split(v, 2))(v)


def test_implicit_handler_without_params_warns_at_class_creation():
    with pytest.warns(quax.QuaxWarning, match=r"NoParams\.mul .* `mul`") as record:

        class NoParams(Box):
            def mul(self, other):
                return NoParams(self.array * other)

    msg = str(record[0].message)
    assert "@quax.not_handler" in msg and "**params" in msg
    assert record[0].filename == __file__  # points at the class statement


def test_paramless_and_keyword_handlers_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Fine(Box):
            def add(self, other, /):  # `add` takes no parameters
                return Fine(self.array + other)

            def integer_pow(self, *, y):  # names its parameters
                return Fine(self.array**y)

            @quax.not_handler
            def sort(self):
                return self

    out = quax.quaxify(lambda v: v + 1.0)(Fine(x3))
    assert isinstance(out, Fine)
    out = quax.quaxify(lambda v: v**3)(Fine(x3))
    assert isinstance(out, Fine)
    np.testing.assert_allclose(out.array, x3**3)


def test_handler_without_params_is_a_clear_error_at_dispatch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", quax.QuaxWarning)

        class NoParams(Box):
            def mul(self, other):
                return NoParams(self.array * other)

    with pytest.raises(quax.HandlerSignatureError) as info:
        quax.quaxify(lambda v: v * 2.0)(NoParams(x3))
    msg = str(info.value)
    assert "NoParams.mul" in msg and "`mul`" in msg and "out_dtype" in msg
    assert "**params" in msg and "@quax.not_handler" in msg
    assert isinstance(info.value, TypeError)


def test_handler_with_wrong_arity_is_a_clear_error_at_dispatch():
    class OneOperand(Box):
        def add(self, /):
            return self

    with pytest.raises(quax.HandlerSignatureError, match=r"OneOperand\.add .* 2"):
        quax.quaxify(lambda v: v + 1.0)(OneOperand(x3))


def test_primitive_attribute_still_rejected():
    with pytest.raises(TypeError, match="defines a property `sign`"):

        class Bad(Box):
            @property
            def sign(self):
                return 1


def _programs() -> list[Any]:
    f, i, b = jnp.ones(3), jnp.ones(3, jnp.int32), jnp.ones(3, bool)
    c = f + 1j

    def everything(f, i, b, c):
        return [
            f + f, f - f, f / f, lax.rem(f, f), lax.pow(f, f), lax.max(f, f),
            lax.min(f, f), lax.atan2(f, f), lax.nextafter(f, f), i & i, i | i,
            i ^ i, ~i, f == f, f != f, f < f, f <= f, f > f, f >= f, -f,
            lax.abs(f), lax.sign(f), lax.floor(f), lax.ceil(f), lax.is_finite(f),
            lax.select_n(b, f, f), lax.clamp(0.0, f, 1.0), lax.shift_left(i, i),
            lax.shift_right_logical(i, i), lax.shift_right_arithmetic(i, i),
            lax.population_count(i), lax.clz(i), lax.real(c), lax.imag(c),
            lax.complex(f, f), lax.square(f), lax.stop_gradient(f), jnp.copy(f),
            lax.erf(f), lax.erfc(f), lax.erf_inv(f), lax.lgamma(f), lax.digamma(f),
            lax.igamma(f, f), lax.igammac(f, f), lax.polygamma(f, f),
            lax.zeta(f, f), lax.bessel_i0e(f), lax.bessel_i1e(f),
        ]  # fmt: skip

    add_any = jax.grad(lambda x: jnp.sum(jnp.sin(x) * x))

    def keys(key):
        return jax.random.fold_in(key, 3), jax.random.key_data(key)

    return [
        jax.make_jaxpr(everything)(f, i, b, c),
        jax.make_jaxpr(add_any)(f),
        jax.make_jaxpr(keys)(jax.random.key(0)),
    ]


def test_paramless_primitives_are_bound_without_parameters():
    seen: dict[str, list[dict]] = {}

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            seen.setdefault(eqn.primitive.name, []).append(dict(eqn.params))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    for closed in _programs():
        visit(closed.jaxpr)
    assert PARAMLESS <= set(seen), PARAMLESS - set(seen)
    for name in PARAMLESS:
        assert all(p == {} for p in seen[name]), (name, seen[name])
