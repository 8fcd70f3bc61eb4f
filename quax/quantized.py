"""Quantized weights (int8, packed int4) with per-channel or per-group scales, for
QLoRA: `quax.lora.loraify` on a quantized model trains adapters on top of them (see
`quax.types.quantized`)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree

from .types.quantized import (
    QuantizedArray as QuantizedArray,
    dequantize as dequantize,
    quantize as quantize,
)


def quantize_model(
    model: PyTree,
    *,
    bits: int = 8,
    group_size: int | None = None,
    where: Callable[[eqx.nn.Linear], bool] | None = None,
) -> PyTree:
    """Quantize the weight of every `eqx.nn.Linear` in `model` (optionally only those
    for which `where(layer)` is true) along its input axis.

    **Arguments:**

    - `model`: any pytree holding equinox `Linear` layers.
    - `bits`, `group_size`: as for `quantize`.
    - `where`: a predicate on the `Linear` layer (default: every one).

    **Returns:**

    A copy of `model` whose selected weights are `QuantizedArray`s; call it through
    `quax.quaxify`, and adapt it with `quax.lora.loraify` for QLoRA.
    """

    def is_linear(x: Any) -> bool:
        return isinstance(x, eqx.nn.Linear)

    def convert(x: Any) -> Any:
        if not is_linear(x) or isinstance(x.weight, QuantizedArray):
            return x
        if where is not None and not where(x):
            return x
        weight = quantize(x.weight, bits=bits, group_size=group_size, axis=-1)
        return eqx.tree_at(lambda layer: layer.weight, x, weight)

    return jtu.tree_map(convert, model, is_leaf=is_linear)
