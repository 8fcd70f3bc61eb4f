"""`TridiagonalMatrix`, as the Quax library's `quax.examples.structured_matrices`
(backed by `quax.structured`, imported on first use)."""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        backing = importlib.import_module("quax.structured")
    except ImportError as err:
        raise ImportError(
            f"quax: `quax.examples.structured_matrices.{name}` needs "
            "`quax.structured`, which this installation of quax does not have."
        ) from err
    return getattr(backing, name)
