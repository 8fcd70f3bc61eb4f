"""Sparse arrays in batched coordinate format (see `quax.types.sparse`)."""

from .types.sparse import BCOO as BCOO
