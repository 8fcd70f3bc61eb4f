"""The public API: exactly these names, with the signatures Quax users know."""

import inspect

import quax


def test_public_names():
    public = {n for n in dir(quax) if not n.startswith("_")}
    expected = {
        "ArrayValue",
        "HandlerResultError",
        "NoHandlerError",
        "QuaxError",
        "QuaxifyTypeError",
        "Value",
        "handler_name",
        "handlers",
        "quaxify",
    }
    optional = {"lora", "quantized", "zero", "types"}  # subpackages, once imported
    assert expected <= public
    assert public - expected <= optional, public - expected


def test_version():
    assert isinstance(quax.__version__, str) and quax.__version__


def test_quaxify_signature_matches_quax_library():
    params = list(inspect.signature(quax.quaxify).parameters)
    assert params == ["fn", "filter_spec"]
    assert inspect.signature(quax.quaxify).parameters["filter_spec"].default is True
