"""LoRA: low-rank adaptation of existing models' weights (see `quax.types.lora`)."""

from .types.lora import (
    LoraArray as LoraArray,
    loraify as loraify,
    merge as merge,
    trainable as trainable,
)
