"""The public API: exactly these names, with the signatures Quax users know."""

import inspect

import quax


def test_public_names():
    public = {n for n in dir(quax) if not n.startswith("_")}
    expected = {
        "ArrayValue",
        "HandlerResultError",
        "HandlerSignatureError",
        "MaterialiseError",
        "MaterialiseWarning",
        "NoHandlerError",
        "QuaxError",
        "QuaxifyTypeError",
        "QuaxWarning",
        "Value",
        "explain",
        "handler",
        "handler_name",
        "handlers",
        "leaf_shardings",
        "not_handler",
        "quaxify",
        "strict",
    }
    # Subpackages, present once imported.
    optional = {
        "examples",
        "lora",
        "named",
        "prng",
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
    params = inspect.signature(quax.quaxify).parameters
    # The Quax library's two positional parameters, then keyword-only additions.
    assert list(params)[:2] == ["fn", "filter_spec"]
    assert params["filter_spec"].default is True
    assert all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[2:])
