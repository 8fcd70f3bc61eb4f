"""Symbolic zeros (see `quax.types.zero`)."""

from .types.zero import Zero as Zero
