"""`BCOO`, as the Quax library's `quax.examples.sparse` (backed by `quax.sparse`,
imported on first use)."""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        backing = importlib.import_module("quax.sparse")
    except ImportError as err:
        raise ImportError(
            f"quax: `quax.examples.sparse.{name}` needs `quax.sparse`, which this "
            "installation of quax does not have."
        ) from err
    return getattr(backing, name)
