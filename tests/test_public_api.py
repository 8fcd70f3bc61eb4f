"""The public API: exactly these names, with the signatures Quax users know."""

import inspect

import quax


def test_public_names():
    public = {n for n in dir(quax) if not n.startswith("_")}
    expected = {
        "ArrayValue",
        "HandlerResultError",
        "HandlerSignatureError",
        "NoHandlerError",
        "QuaxError",
        "QuaxifyTypeError",
        "QuaxWarning",
        "Value",
        "handler",
        "handler_name",
        "handlers",
        "leaf_shardings",
        "not_handler",
        "quaxify",
    }
    # Subpackages, present once imported.
    optional = {
        "examples",
        "lora",
        "named",
        "prng",
        "quantized",
        "sparse",
        "structured",
        "types",
        "units",
        "zero",
    }
    assert expected <= public
    assert public - expected <= optional, public - expected


def test_version():
    assert isinstance(quax.__version__, str) and quax.__version__


def test_quaxify_signature_matches_quax_library():
    params = list(inspect.signature(quax.quaxify).parameters)
    assert params == ["fn", "filter_spec"]
    assert inspect.signature(quax.quaxify).parameters["filter_spec"].default is True
